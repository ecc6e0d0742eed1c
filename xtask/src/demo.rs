//! `cargo xtask demo`: a throwaway Postgres, pgward in front of it, a sample psql session
//! authenticated by a token, then the audit tail and verify.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::pg::{self, Cluster};
use crate::util::{self, step};

#[derive(clap::Args, Default)]
pub struct DemoArgs {
    /// Keep pgward and Postgres running after the demo until Ctrl-C.
    #[arg(long)]
    pub keep: bool,
}

/// A child cgroup v2 for the demo: the eBPF programs attach here (never the root), and the
/// demo's psql runs inside it. Removed on drop (with pgward's own `pgward-gateway` child).
struct DemoCgroup(PathBuf);

impl DemoCgroup {
    fn create() -> Option<DemoCgroup> {
        let root = Path::new("/sys/fs/cgroup/unified");
        if unsafe { geteuid() } != 0 || !root.join("cgroup.procs").exists() {
            return None;
        }
        let dir = root.join(format!("pgward-demo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        Some(DemoCgroup(dir))
    }
}

impl Drop for DemoCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(self.0.join("pgward-gateway"));
        let _ = std::fs::remove_dir(&self.0);
    }
}

unsafe extern "C" {
    fn geteuid() -> u32;
}

struct Gateway(Child);

/// Interception is pinned and outlives pgward: the demo removes it at the end (audited), after
/// the gateway has stopped (declared before the `Gateway`, so dropped after it).
struct Detach(PathBuf, PathBuf);

impl Drop for Detach {
    fn drop(&mut self) {
        let _ = Command::new(&self.0)
            .args(["intercept", "detach", "--reason", "demo ends", "--config"])
            .arg(&self.1)
            .env("PGWARD_LOG", "warn")
            .stdout(Stdio::null())
            .status();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // SIGTERM our own child by pid, then wait.
        let _ = Command::new("kill").arg("-TERM").arg(self.0.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run(args: &DemoArgs) -> Result<()> {
    let root = util::workspace_root();
    util::run_timed("build pgward", util::cargo().args(["build", "-p", "gateway-user"]).current_dir(&root))?;
    // Where the build above put it: $CARGO_TARGET_DIR when set (as `bench` finds it).
    let target_dir = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
    let pgward = target_dir.join("debug/pgward");
    let base = root.join("target/demo");

    step("starting a throwaway PostgreSQL 15");
    let cluster = Cluster::start(&base.join("pg"), &[])?;
    step(&format!("postgres on 127.0.0.1:{} (service role {})", cluster.port, pg::SERVICE_USER));

    let setup = init_gateway(&pgward, &base, &cluster)?;
    add_demo_policy(&setup)?;

    // Interception: clients dial the real Postgres port and land in pgward. The demo Postgres
    // listens on its own port (standing in for 5432) and stays there ("in place" layout).
    let cgroup = DemoCgroup::create();
    match &cgroup {
        Some(cg) => enable_interception(&setup, cg, cluster.port)?,
        None => step("interception skipped (needs root and cgroup v2 at /sys/fs/cgroup/unified); clients dial pgward directly"),
    }

    step(&format!("pgward serve --config {}", setup.config.display()));
    let child = spawn_gateway(&pgward, &base, &setup)?;
    let _detach = cgroup.is_some().then(|| Detach(pgward.clone(), setup.config.clone()));
    let gw = Gateway(child);
    wait_port(setup.port)?;
    if cgroup.is_some() {
        wait_attached(&setup)?;
    }
    // With interception, psql dials the *Postgres* port from inside the demo cgroup.
    let dial_port = if cgroup.is_some() { cluster.port } else { setup.port };
    let psql = |args: &[&str]| psql_command(cgroup.as_ref(), dial_port, args);

    sample_sessions(&pgward, &setup.config, dial_port, psql)?;
    if cgroup.is_some() {
        step("pgward status");
        print!("{}", run_ok(Command::new(&pgward).args(["status", "--config"]).arg(&setup.config))?);
    }
    std::thread::sleep(Duration::from_millis(300));
    show_audit(&pgward, &setup.config)?;

    if args.keep {
        step(&format!(
            "pgward is on 127.0.0.1:{port}; try: PGPASSWORD=$({} token issue --config {} --user alice) psql -h 127.0.0.1 -p {port} -U alice app   (Ctrl-C to stop)",
            pgward.display(),
            setup.config.display(),
            port = setup.port,
        ));
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    drop(gw);
    drop(cgroup);
    cluster.stop();
    step("demo finished: pgward and Postgres stopped");
    Ok(())
}

/// The demo's pgward: its directory (made by `pgward init`), config file and listen port.
struct GatewaySetup {
    dir: PathBuf,
    config: PathBuf,
    port: u16,
}

/// `pgward init` a fresh directory under `base`, pointed at the demo cluster's `app` database.
fn init_gateway(pgward: &Path, base: &Path, cluster: &Cluster) -> Result<GatewaySetup> {
    let gw_dir = base.join("pgward");
    let _ = std::fs::remove_dir_all(&gw_dir);
    let pwfile = base.join("svc.password");
    std::fs::write(&pwfile, format!("{}\n", pg::SERVICE_PASSWORD))?;
    let port = pg::gateway_port()?;
    let listen = format!("127.0.0.1:{port}");
    let upstream = format!("postgres://{}@127.0.0.1:{}/app", pg::SERVICE_USER, cluster.port);
    run_ok(Command::new(pgward).args(["init", "--dir"]).arg(&gw_dir).args(["--listen", &listen, "--upstream", &upstream, "--upstream-password-file"]).arg(&pwfile))?;
    let config = gw_dir.join("pgward.toml");
    Ok(GatewaySetup { dir: gw_dir, config, port })
}

/// A demo policy on top of the default one: no UPDATE/DELETE without WHERE, and card
/// numbers masked for everyone but pii_readers.
fn add_demo_policy(setup: &GatewaySetup) -> Result<()> {
    std::fs::write(
        setup.dir.join("policies/demo.toml"),
        "[[rule]]\nname = \"no-unbounded-writes\"\naction = \"deny\"\nmodifiers = [\"no_where\"]\n\
         reason = \"UPDATE and DELETE need a WHERE clause\"\n\n\
         [[mask]]\nname = \"cards\"\ncolumns = [\"public.customers.card\"]\ndetect = [\"card\"]\n\
         style = \"keep_last\"\nkeep = 4\nexcept_groups = [\"pii_readers\"]\n",
    )?;
    let text = std::fs::read_to_string(&setup.config)?;
    let text = text.replace(
        "files = [\"policies/default.toml\"]",
        "files = [\"policies/default.toml\", \"policies/demo.toml\"]",
    );
    std::fs::write(&setup.config, text)?;
    Ok(())
}

/// Turn interception on for connects from `cg` to the demo Postgres port `pg_port`.
fn enable_interception(setup: &GatewaySetup, cg: &DemoCgroup, pg_port: u16) -> Result<()> {
    let mut text = std::fs::read_to_string(&setup.config)?;
    text.push_str(&format!(
        "\n[intercept]\nenabled = true\ncgroup = \"{}\"\nprotected = [\"0.0.0.0:{p}\", \"[::]:{p}\"]\nsk_lookup = false\n",
        cg.0.display(),
        p = pg_port
    ));
    std::fs::write(&setup.config, text)?;
    step(&format!("interception on: connects to port {} from cgroup {} go to pgward", pg_port, cg.0.display()));
    Ok(())
}

/// `pgward serve`, its log in `base/pgward.log`.
fn spawn_gateway(pgward: &Path, base: &Path, setup: &GatewaySetup) -> Result<Child> {
    let log = std::fs::File::create(base.join("pgward.log"))?;
    Command::new(pgward)
        .args(["serve", "--config"])
        .arg(&setup.config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting pgward serve")
}

/// Wait for pgward's interception state file: its eBPF programs are attached.
fn wait_attached(setup: &GatewaySetup) -> Result<()> {
    let state = setup.dir.join("intercept.state.json");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !state.exists() {
        if Instant::now() > deadline {
            bail!("pgward did not attach its eBPF programs; see target/demo/pgward.log");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// psql as alice to `app` on `dial_port`; with a demo cgroup, run from inside it.
fn psql_command(cgroup: Option<&DemoCgroup>, dial_port: u16, args: &[&str]) -> Command {
    let mut c = match cgroup {
        Some(cg) => {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(format!("echo $$ > {}/cgroup.procs && exec psql \"$@\"", cg.0.display()))
                .arg("psql");
            c
        }
        None => Command::new("psql"),
    };
    c.args(["-X", "-h", "127.0.0.1", "-p", &dial_port.to_string(), "-U", "alice", "-d", "app"]).args(args);
    c
}

/// The statements of the sample session: masking, strict masking and a policy denial.
const SAMPLE_SQL: &str = "\\echo '--- alice connects to pgward with a token as her password'\n\
        select current_setting('application_name') as upstream_application_name;\n\
        create table if not exists customers(id int primary key, name text, card text);\n\
        insert into customers values (1, 'Ada', '4242424242424242'), (2, 'Grace', '5555555555554444') on conflict do nothing;\n\
        \\echo '--- card numbers are masked for alice (whatever the alias or expression)'\n\
        select id, name, card, upper(card) as also_card from customers order by id;\n\
        \\echo '--- strict masking refuses what it cannot prove masked (a pattern match on a card)'\n\
        select id from customers where card like '4242%';\n\
        \\echo '--- DELETE without WHERE is blocked by the policy; the session goes on'\n\
        delete from customers;\n\
        begin; update customers set name = 'Ada L.' where id = 1; commit;\n\
        select count(*) from customers;\n\
        select 1/0;\n";

/// Alice's session with a token, then a login with the service password (refused).
fn sample_sessions(pgward: &Path, config: &Path, dial_port: u16, psql: impl Fn(&[&str]) -> Command) -> Result<()> {
    let token = run_ok(Command::new(pgward).args(["token", "issue", "--config"]).arg(config).args(["--user", "alice", "--groups", "analysts", "--ttl", "15m"]))?;
    let token = token.trim().to_string();
    step(&format!("token for alice: {}…", &token[..token.len().min(40)]));

    step(&format!("psql -h 127.0.0.1 -p {dial_port} -U alice app   (a session through pgward)"));
    let out = psql(&["-v", "ON_ERROR_STOP=0"])
        .env("PGPASSWORD", &token)
        .env("PGSSLMODE", "require")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            if let Some(mut i) = c.stdin.take() {
                i.write_all(SAMPLE_SQL.as_bytes())?;
            }
            c.wait_with_output()
        })?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));

    step("the service password is not a token: psql with it is refused");
    let out = psql(&["-c", "select 1"])
        .env("PGPASSWORD", pg::SERVICE_PASSWORD)
        .output()?;
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// `pgward audit tail` and `pgward audit verify`; a failed verify fails the demo.
fn show_audit(pgward: &Path, config: &Path) -> Result<()> {
    step("pgward audit tail");
    let tail = run_ok(Command::new(pgward).args(["audit", "tail", "--config"]).arg(config))?;
    print!("{tail}");
    step("pgward audit verify");
    let verify = Command::new(pgward).args(["audit", "verify", "--config"]).arg(config).output()?;
    print!("{}", String::from_utf8_lossy(&verify.stdout));
    eprint!("{}", String::from_utf8_lossy(&verify.stderr));
    if !verify.status.success() {
        bail!("audit verify failed");
    }
    Ok(())
}

fn run_ok(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!("{:?} failed: {}{}", cmd.get_args().collect::<Vec<_>>(), String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn wait_port(port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("pgward did not start listening on {port}; see target/demo/pgward.log")
}
