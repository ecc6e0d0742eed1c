//! `pgward serve`: run the gateway.

use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[arg(long)]
    pub config: PathBuf,
}

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let cfg = crate::config::Config::load(&args.config)?;
    raise_fd_limit();
    crate::server::run(cfg)?;
    Ok(ExitCode::SUCCESS)
}

/// A session holds three descriptors (client, upstream, and the upstream's dup the audit writer
/// sends held statements on), so the common soft limit of 1024 would cap pgward at ~330
/// sessions: raise the soft limit to the hard one (as nginx's `worker_rlimit_nofile` or Go's
/// runtime do). The installed unit sets LimitNOFILE itself. Returns the soft limit now in force.
pub(crate) fn raise_fd_limit() -> Option<u64> {
    let mut rl = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid, initialised struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return None;
    }
    if rl.rlim_cur < rl.rlim_max {
        let raised = libc::rlimit { rlim_cur: rl.rlim_max, rlim_max: rl.rlim_max };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            tracing::debug!(from = rl.rlim_cur, to = rl.rlim_max, "raised the open-file limit");
            return Some(rl.rlim_max);
        }
        tracing::warn!(limit = rl.rlim_cur, "could not raise the open-file limit: {}", std::io::Error::last_os_error());
    }
    Some(rl.rlim_cur)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_open_file_limit_is_raised_to_the_hard_limit() {
        let mut rl = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: valid struct.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) }, 0);
        let hard = rl.rlim_max;
        // Lower the soft limit (allowed without privileges), then raise it back.
        let lowered = libc::rlimit { rlim_cur: hard.min(512), rlim_max: hard };
        // SAFETY: valid struct.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lowered) }, 0);
        assert_eq!(super::raise_fd_limit(), Some(hard));
        // SAFETY: valid struct.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) }, 0);
        assert_eq!(rl.rlim_cur, hard);
    }
}
