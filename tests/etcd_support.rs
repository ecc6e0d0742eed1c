//! Shared by tests/etcd.rs (included with `#[path]`): a real etcd cluster (Debian's
//! `etcd-server`), started by the test as its own user on loopback ports in a temp dir, its
//! members stopped and restarted by pid.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::tls::TestAuthority;
use crate::common::{free_port, rand_hex, stop_child, wait_for};

/// Where Debian's etcd-server package installs the daemon.
pub const ETCD: &str = "/usr/bin/etcd";

/// How long a cluster may take to elect a leader and answer.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Server and client certificates for a TLS cluster with client-certificate auth.
pub struct EtcdTls {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl EtcdTls {
    /// A CA, a server certificate for 127.0.0.1 and a client certificate, written to `dir`.
    pub fn new(dir: &Path) -> EtcdTls {
        use rcgen::ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
        let authority = TestAuthority::new("pgward etcd test CA");
        let (scert, skey) = authority.leaf("127.0.0.1", &["127.0.0.1", "localhost"], vec![ServerAuth, ClientAuth]);
        let (ccert, ckey) = authority.leaf("pgward", &[], vec![ClientAuth]);
        let t = EtcdTls {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        };
        for (p, text) in [
            (&t.ca, authority.pem().to_owned()),
            (&t.server_cert, scert),
            (&t.server_key, skey),
            (&t.client_cert, ccert),
            (&t.client_key, ckey),
        ] {
            std::fs::write(p, text).expect("write PEM");
        }
        t
    }
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A cluster of `etcd` processes on 127.0.0.1.
pub struct EtcdCluster {
    members: Vec<Member>,
    token: String,
    tls: Option<EtcdTls>,
    pub dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Start `n` members (plain http) and wait until the cluster answers.
    pub fn start(n: usize) -> EtcdCluster {
        Self::start_with(n, false)
    }

    /// One member over TLS that demands a client certificate signed by its CA.
    pub fn start_tls() -> EtcdCluster {
        Self::start_with(1, true)
    }

    fn start_with(n: usize, tls: bool) -> EtcdCluster {
        let dir = tempfile::Builder::new().prefix("pgward-e2e-etcd-").tempdir().expect("temp dir");
        let members = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                data: dir.path().join(format!("m{i}")),
                log: dir.path().join(format!("m{i}.log")),
                child: None,
            })
            .collect();
        let tls = tls.then(|| EtcdTls::new(dir.path()));
        let mut c = EtcdCluster { members, token: format!("pgward-test-{}", rand_hex(8)), tls, dir };
        for i in 0..n {
            c.spawn(i);
        }
        c.wait_ready();
        c
    }

    pub fn tls(&self) -> Option<&EtcdTls> {
        self.tls.as_ref()
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// Client URLs of every member.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| format!("{}://127.0.0.1:{}", self.scheme(), m.client_port)).collect()
    }

    fn spawn(&mut self, i: usize) {
        let scheme = self.scheme();
        let initial: Vec<String> =
            self.members.iter().map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port)).collect();
        let m = &self.members[i];
        let client = format!("{scheme}://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&m.log).expect("etcd log");
        let mut cmd = Command::new(ETCD);
        cmd.args(["--name", &m.name, "--data-dir"])
            .arg(&m.data)
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial.join(","), "--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.token])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log));
        if let Some(t) = &self.tls {
            cmd.arg("--cert-file").arg(&t.server_cert).arg("--key-file").arg(&t.server_key);
            cmd.arg("--client-cert-auth").arg("--trusted-ca-file").arg(&t.ca);
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {ETCD}: {e} (apt-get install etcd-server)"));
        self.members[i].child = Some(child);
    }

    /// SIGKILL member `i` (our own child, by pid).
    pub fn kill(&mut self, i: usize) {
        if let Some(child) = self.members[i].child.take() {
            stop_child(child, libc::SIGKILL, Duration::from_secs(10));
        }
    }

    /// Start member `i` again on its data directory.
    pub fn restart(&mut self, i: usize) {
        assert!(self.members[i].child.is_none(), "member {i} is running");
        self.spawn(i);
    }

    pub fn kill_all(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }

    /// Start every stopped member and wait until the cluster answers.
    pub fn restart_all(&mut self) {
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                self.spawn(i);
            }
        }
        self.wait_ready();
    }

    /// Until a linearizable read through the running members succeeds.
    pub fn wait_ready(&self) {
        let endpoints: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| format!("{}://127.0.0.1:{}", self.scheme(), m.client_port))
            .collect();
        // A thread of its own: the caller may be inside a tokio runtime (an async test).
        let probe = || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            rt.block_on(async {
                let mut opts = etcd_client::ConnectOptions::new().with_timeout(Duration::from_secs(2));
                if let Some(t) = &self.tls {
                    let read = |p: &Path| std::fs::read_to_string(p).expect("PEM");
                    opts = opts.with_tls(
                        etcd_client::TlsOptions::new()
                            .ca_certificate(etcd_client::Certificate::from_pem(read(&t.ca)))
                            .identity(etcd_client::Identity::from_pem(read(&t.client_cert), read(&t.client_key))),
                    );
                }
                let mut c = etcd_client::Client::connect(&endpoints, Some(opts)).await.ok()?;
                c.get("/ready-probe", None).await.ok().map(|_| ())
            })
        };
        wait_for("etcd answers", READY_TIMEOUT, || std::thread::scope(|s| s.spawn(probe).join().ok().flatten()))
    }

    /// What member `i` logged.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.members[i].log).unwrap_or_default()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        self.kill_all();
    }
}
