//! Where the exporter sends records, from `[audit]`: checked once at start, so a missing
//! address or an unreadable CA file stops `serve` instead of silently exporting nothing.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::ClientConfig;
use rustls_pki_types::ServerName;

use crate::config::{Config, ExportKind};

/// The sink, ready to connect to.
#[derive(Clone)]
pub enum Target {
    /// JSON lines on stdout.
    Stdout,
    /// RFC 5424 datagrams to a unix socket.
    Datagram(PathBuf),
    /// RFC 5424, octet-counted, over TCP to `HOST:PORT`.
    Tcp { addr: String },
    /// The same over TLS, the receiver's certificate checked against `config`'s roots and `name`.
    Tls { addr: String, name: ServerName<'static>, config: Arc<ClientConfig> },
}

/// What the exporter needs: the log to read and the sink to write to.
#[derive(Clone)]
pub struct ExportSettings {
    /// The audit directory (segments and the cursor file).
    pub dir: PathBuf,
    pub target: Target,
    /// The longest syslog message the receiver takes whole (`audit.syslog_max_message`).
    pub max_message: usize,
}

impl std::fmt::Debug for ExportSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportSettings").field("dir", &self.dir).field("sink", &self.sink_id()).finish()
    }
}

impl ExportSettings {
    /// The export `[audit]` asks for; `None` for `export = "none"`.
    pub fn from_config(cfg: &Config) -> Result<Option<ExportSettings>, String> {
        let a = &cfg.audit;
        let address = || {
            a.syslog_address.clone().ok_or_else(|| {
                format!("audit.export = {:?} needs audit.syslog_address (HOST:PORT)", kind_name(a.export))
            })
        };
        let target = match a.export {
            ExportKind::None => return Ok(None),
            ExportKind::Stdout => Target::Stdout,
            ExportKind::Syslog => Target::Datagram(cfg.resolve(&a.syslog_socket)),
            ExportKind::SyslogTcp => Target::Tcp { addr: address()? },
            ExportKind::SyslogTls => {
                let addr = address()?;
                let ca = a
                    .syslog_ca
                    .as_ref()
                    .ok_or("audit.export = \"syslog-tls\" needs audit.syslog_ca (PEM CA certificates)")?;
                let config =
                    crate::tls::client_config_insecure_or_roots(Some(&cfg.resolve(ca))).map_err(|e| e.to_string())?;
                let host = match &a.syslog_server_name {
                    Some(n) => n.clone(),
                    None => {
                        host_part(&addr).ok_or_else(|| format!("audit.syslog_address {addr:?} is not HOST:PORT"))?
                    }
                };
                let name = ServerName::try_from(host.clone())
                    .map_err(|e| format!("audit.syslog_server_name {host:?} is not a DNS name or IP address: {e}"))?;
                Target::Tls { addr, name, config }
            }
        };
        Ok(Some(ExportSettings { dir: cfg.resolve(&a.dir), target, max_message: a.syslog_max_message }))
    }

    /// Names the sink in logs and in the cursor file: a cursor for another sink is not used.
    pub fn sink_id(&self) -> String {
        match &self.target {
            Target::Stdout => "stdout".into(),
            Target::Datagram(p) => format!("syslog {}", p.display()),
            Target::Tcp { addr } => format!("syslog-tcp {addr}"),
            Target::Tls { addr, .. } => format!("syslog-tls {addr}"),
        }
    }
}

fn kind_name(k: ExportKind) -> &'static str {
    match k {
        ExportKind::None => "none",
        ExportKind::Syslog => "syslog",
        ExportKind::Stdout => "stdout",
        ExportKind::SyslogTcp => "syslog-tcp",
        ExportKind::SyslogTls => "syslog-tls",
    }
}

/// `host` of `host:port` or `[v6]:port`.
fn host_part(addr: &str) -> Option<String> {
    let (host, port) = addr.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    (!host.is_empty()).then(|| host.to_string())
}

#[cfg(test)]
mod tests {
    use super::host_part;

    #[test]
    fn host_of_an_address() {
        assert_eq!(host_part("logs.example.net:6514").as_deref(), Some("logs.example.net"));
        assert_eq!(host_part("[::1]:6514").as_deref(), Some("::1"));
        assert_eq!(host_part("127.0.0.1:x"), None);
        assert_eq!(host_part(":6514"), None);
    }
}
