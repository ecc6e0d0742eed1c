//! Shared by tests/export.rs (included with `#[path]`, not a test binary of its own).
//!
//! - [`TestCa`] (from `common::tls`): a CA and a server certificate for 127.0.0.1.
//! - [`Rsyslog`]: Debian's real `rsyslogd`, run in the foreground by the test with its own
//!   config, receiving syslog over TLS (imtcp with the gtls driver, RFC 5425) on one loopback
//!   port and over plain TCP (imptcp, octet-counted framing, RFC 6587) on another, and writing
//!   pgward's messages to a file. Stopped (by pid) on Drop.
//! - [`rewrite_with_key`]: what someone holding the checkpoint key can do to a stopped
//!   gateway's log: change a record, re-chain, re-sign every later checkpoint, rewrite HEAD;
//!   [`key_holder_rewrite`] does it to a copy of a running gateway's log.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub use crate::common::tls::TestCa;
use crate::common::{free_port, stop_child, wait_for};

/// The `maxMessageSize` the test's rsyslog is configured with (256 KiB; audit records with
/// their SQL are longer than rsyslog's 8 KiB default).
pub const RSYSLOG_MAX_MESSAGE: usize = 256 * 1024;

/// Where Debian's rsyslog package installs the daemon.
pub const RSYSLOGD: &str = "/usr/sbin/rsyslogd";

/// A real rsyslogd receiving RFC 5425 (TLS) on 127.0.0.1:`port` and RFC 6587 (plain TCP,
/// octet-counted) on 127.0.0.1:`tcp_port`.
pub struct Rsyslog {
    pub dir: PathBuf,
    pub port: u16,
    pub tcp_port: u16,
    /// What rsyslog wrote for pgward: one message per line.
    pub out: PathBuf,
    conf: PathBuf,
    child: Option<Child>,
}

impl Rsyslog {
    pub fn start(dir: &Path, ca: &TestCa) -> Rsyslog {
        let port = free_port();
        let tcp_port = free_port();
        let work = dir.join("work");
        std::fs::create_dir_all(&work).expect("work dir");
        let out = dir.join("pgward.log");
        let conf = dir.join("rsyslog.conf");
        let text = format!(
            r#"global(workDirectory="{work}" maxMessageSize="{RSYSLOG_MAX_MESSAGE}"
       defaultNetstreamDriver="gtls"
       defaultNetstreamDriverCAFile="{ca}"
       defaultNetstreamDriverCertFile="{cert}"
       defaultNetstreamDriverKeyFile="{key}")
module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="anon")
input(type="imtcp" address="127.0.0.1" port="{port}")
module(load="imptcp")
input(type="imptcp" address="127.0.0.1" port="{tcp_port}")
template(name="pgward" type="string" string="%timereported:::date-rfc3339% %hostname% %app-name% %msgid% %msg%\n")
if $app-name == "pgward" then {{
  action(type="omfile" file="{out}" template="pgward")
  stop
}}
"#,
            work = work.display(),
            ca = ca.ca_pem.display(),
            cert = ca.cert_pem.display(),
            key = ca.key_pem.display(),
            out = out.display(),
        );
        std::fs::write(&conf, text).expect("write rsyslog.conf");
        let mut r = Rsyslog { dir: dir.to_owned(), port, tcp_port, out, conf, child: None };
        r.spawn();
        r
    }

    /// Where the TLS input listens.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Where the plain TCP input listens.
    pub fn tcp_addr(&self) -> String {
        format!("127.0.0.1:{}", self.tcp_port)
    }

    /// Run rsyslogd in the foreground (`-n`) and wait until it listens.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "rsyslogd already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("rsyslogd.stderr"))
            .expect("stderr file");
        let child = Command::new(RSYSLOGD)
            .arg("-n")
            .arg("-f")
            .arg(&self.conf)
            .arg("-i")
            .arg(self.dir.join("rsyslogd.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("dup")))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {RSYSLOGD} (apt package rsyslog, rsyslog-gnutls): {e}"));
        self.child = Some(child);
        let (port, tcp_port) = (self.port, self.tcp_port);
        wait_for("rsyslogd to listen", Duration::from_secs(30), || {
            (listening(port) && listening(tcp_port)).then_some(())
        });
    }

    /// SIGTERM, and wait for it to exit.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            stop_child(child, libc::SIGTERM, Duration::from_secs(20));
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("rsyslogd.stderr")).unwrap_or_default()
    }

    /// The seq of every record rsyslog wrote, in the order written.
    pub fn seqs(&self) -> Vec<u64> {
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let json = &l[l.find("{\"seq\":")?..];
                serde_json::from_str::<serde_json::Value>(json).ok()?["seq"].as_u64()
            })
            .collect()
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether something listens on 127.0.0.1:`port` (from /proc/net/tcp, without connecting:
/// a probe connection would be a failed TLS session in rsyslog's log).
fn listening(port: u16) -> bool {
    let want = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/tcp").unwrap_or_default().lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && f[1] == want && f[3] == "0A"
    })
}

/// A copy of `pw`'s audit log (in the returned directory, with a config naming it) in which
/// the holder of the checkpoint key rewrote the record with seq `target` with `edit`
/// ([`rewrite_with_key`]).
pub fn key_holder_rewrite(
    pw: &crate::common::Pgward,
    target: u64,
    edit: impl Fn(&mut pgward::audit::Record),
) -> (tempfile::TempDir, PathBuf) {
    let copy_dir = tempfile::tempdir().unwrap();
    let cfg = pw.copy_with_audit(copy_dir.path());
    let key = pw.config_path_value("audit.checkpoint_key");
    let kid = pw.config_str("audit.checkpoint_kid");
    rewrite_with_key(&copy_dir.path().join("audit"), target, &key, &kid, edit);
    (copy_dir, cfg)
}

/// Rewrite the record with seq `target` in the log at `dir` with `edit`, then do what only the
/// holder of the checkpoint key (`key_pem`, `kid`) can: re-chain every later record, re-sign
/// every later checkpoint and rewrite HEAD. Lines before `target` stay byte for byte.
pub fn rewrite_with_key(dir: &Path, target: u64, key_pem: &Path, kid: &str, edit: impl Fn(&mut pgward::audit::Record)) {
    use pgward::audit::chain::{self, Head};
    use pgward::audit::{CheckpointSigner, Kind, Record};
    let signer = CheckpointSigner::from_pkcs8_pem_file(key_pem, kid).expect("the checkpoint key");
    let mut prev = chain::GENESIS_HASH.to_string();
    let mut last_ckpt: Option<Record> = None;
    for seg in chain::list_segments(dir).expect("segments") {
        let text = std::fs::read_to_string(&seg.path).expect("segment");
        let mut out = String::new();
        for l in text.lines() {
            let mut rec: Record = serde_json::from_str(l).expect("a record");
            if rec.seq < target {
                out.push_str(l);
                out.push('\n');
                prev = rec.hash.clone();
                if rec.kind == Kind::Checkpoint {
                    last_ckpt = Some(rec);
                }
                continue;
            }
            if rec.seq == target {
                edit(&mut rec);
            }
            if rec.kind == Kind::Checkpoint {
                rec.anchor_hash = Some(prev.clone());
                rec.sig = Some(signer.sign(rec.anchor_seq.unwrap_or(0), &prev));
            }
            rec.prev_hash = prev.clone();
            rec.hash.clear();
            let mut c = Vec::new();
            rec.write_json(&mut c).expect("serialize");
            let h = chain::chain_hash(prev.as_bytes(), &c, b"");
            let h = String::from_utf8(h.to_vec()).expect("hex");
            c.pop();
            out.push_str(std::str::from_utf8(&c).expect("utf8"));
            out.push_str(&format!(",\"hash\":\"{h}\"}}\n"));
            prev = h.clone();
            rec.hash = h;
            if rec.kind == Kind::Checkpoint {
                last_ckpt = Some(rec);
            }
        }
        std::fs::write(&seg.path, out).expect("write segment");
    }
    let c = last_ckpt.expect("a checkpoint in the log");
    let head = Head {
        seq: c.seq,
        hash: c.hash,
        anchor_seq: c.anchor_seq.unwrap_or(0),
        anchor_hash: c.anchor_hash.unwrap_or_default(),
        sig: c.sig.unwrap_or_default(),
        kid: c.kid.unwrap_or_default(),
        ts: c.ts,
    };
    std::fs::write(dir.join(chain::HEAD_FILE), serde_json::to_vec(&head).expect("HEAD")).expect("write HEAD");
}
