//! Prometheus metrics (OpenMetrics text via prometheus-client) on a loopback port
//! (`server.metrics_listen`). Session counters are derived from the audit records as they
//! become durable — the audit writer is the one place every login, statement and result
//! passes — so the numbers agree with the log. eBPF counters are read from the kernel at
//! scrape time.

use std::sync::{Arc, LazyLock};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::Config;

pub struct Metrics {
    registry: Registry,
    pub logins: Counter,
    pub logins_failed: Counter,
    pub sessions_active: Gauge,
    pub statements: Counter,
    pub statements_denied: Counter,
    pub statement_errors: Counter,
    pub values_masked: Counter,
    pub audit_records: Counter,
    pub audit_batches_failed: Counter,
    pub audit_fsync_seconds: Histogram,
    /// Upstream session pooling (see `pool`): logins served by a pooled connection, logins
    /// that opened a new one, connections closed instead of pooled (label `reason`), and the
    /// idle connections in the pool.
    pub pool_hits: Counter,
    pub pool_misses: Counter,
    pub pool_discards: Family<Vec<(String, String)>, Counter>,
    pub pool_idle: Gauge,
    /// Long statement texts parsed on the blocking pool instead of the event loop (session).
    pub statements_analyzed_off_loop: Counter,
    ebpf: Family<Vec<(String, String)>, Gauge>,
    /// The access state backend (`[access] backend`): 1 while it answers (always with the file
    /// backend), and the age of the state in force, refreshed at scrape time from
    /// `access_synced_at_ms` (unix ms of the last complete read of etcd; 0: never).
    pub access_backend_connected: Gauge,
    pub access_synced_at_ms: std::sync::atomic::AtomicI64,
    access_state_age_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// What the metrics need of one durable audit record. The audit writer makes it from the
/// record (see `audit::Record::metrics_event`), so the metrics need not know the record type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    /// A statement the policy denied.
    pub denied: bool,
    /// A result that ended in an error (a SQLSTATE).
    pub error: bool,
    /// Result values masked.
    pub masked: u64,
}

/// The kinds of audit record the counters tell apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Login,
    LoginFailed,
    Statement,
    Result,
    SessionEnd,
    /// Any other record: counted in `audit_records` only.
    Other,
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("pgward");
        let m = Metrics {
            logins: Counter::default(),
            logins_failed: Counter::default(),
            sessions_active: Gauge::default(),
            statements: Counter::default(),
            statements_denied: Counter::default(),
            statement_errors: Counter::default(),
            values_masked: Counter::default(),
            audit_records: Counter::default(),
            audit_batches_failed: Counter::default(),
            // 50 µs .. ~100 ms
            audit_fsync_seconds: Histogram::new([
                0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
            ]),
            pool_hits: Counter::default(),
            pool_misses: Counter::default(),
            statements_analyzed_off_loop: Counter::default(),
            pool_discards: Family::default(),
            pool_idle: Gauge::default(),
            ebpf: Family::default(),
            access_backend_connected: Gauge::default(),
            access_synced_at_ms: std::sync::atomic::AtomicI64::new(0),
            access_state_age_seconds: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("logins", "Successful logins (token verified, upstream connected)", m.logins.clone());
        registry.register("logins_failed", "Refused logins", m.logins_failed.clone());
        registry.register("sessions_active", "Sessions currently open", m.sessions_active.clone());
        registry.register("statements", "Statements audited (allowed and denied)", m.statements.clone());
        registry.register("statements_denied", "Statements blocked by policy", m.statements_denied.clone());
        registry.register("statement_errors", "Statements that ended in an error", m.statement_errors.clone());
        registry.register("values_masked", "Result values masked", m.values_masked.clone());
        registry.register("audit_records", "Audit records made durable", m.audit_records.clone());
        registry.register("audit_batches_failed", "Audit batches that could not be made durable", m.audit_batches_failed.clone());
        registry.register("audit_fsync_seconds", "Time of one audit write + fdatasync", m.audit_fsync_seconds.clone());
        registry.register("upstream_pool_hits", "Logins served by a pooled upstream connection", m.pool_hits.clone());
        registry.register("upstream_pool_misses", "Logins that opened a new upstream connection while pooling is on", m.pool_misses.clone());
        registry.register(
            "statements_analyzed_off_loop",
            "Long statement texts the policy parsed on a blocking thread, not on the event loop",
            m.statements_analyzed_off_loop.clone(),
        );
        registry.register(
            "upstream_pool_discards",
            "Upstream connections closed instead of pooled or reused, by reason",
            m.pool_discards.clone(),
        );
        registry.register("upstream_pool_idle", "Idle upstream connections in the pool", m.pool_idle.clone());
        registry.register("ebpf", "eBPF program counters (from the kernel maps)", m.ebpf.clone());
        registry.register(
            "access_backend_connected",
            "1 while the access state backend answers (etcd; always 1 with the file backend)",
            m.access_backend_connected.clone(),
        );
        registry.register(
            "access_state_age_seconds",
            "Seconds since the access state was last read in full from etcd (0 with the file backend; -1: never)",
            m.access_state_age_seconds.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Account one durable audit record from its summary.
    pub fn event(&self, e: Event) {
        self.audit_records.inc();
        match e.kind {
            EventKind::Login => {
                self.logins.inc();
                self.sessions_active.inc();
            }
            EventKind::SessionEnd => {
                self.sessions_active.dec();
            }
            EventKind::LoginFailed => {
                self.logins_failed.inc();
            }
            EventKind::Statement => {
                self.statements.inc();
                if e.denied {
                    self.statements_denied.inc();
                }
            }
            EventKind::Result => {
                if e.error {
                    self.statement_errors.inc();
                }
                if e.masked > 0 {
                    self.values_masked.inc_by(e.masked);
                }
            }
            _ => {}
        }
    }

    /// One upstream connection closed instead of pooled or reused, for `reason`.
    pub fn pool_discard(&self, reason: &str) {
        self.pool_discards.get_or_create(&vec![("reason".into(), reason.into())]).inc();
    }

    /// The OpenMetrics text, with eBPF counters refreshed from the kernel.
    pub fn render(&self, cfg: &Config) -> String {
        if cfg.intercept.enabled
            && let Ok(st) = crate::ebpf::status(cfg)
        {
            for c in st.counters {
                self.ebpf
                    .get_or_create(&vec![("program".into(), c.program), ("counter".into(), c.counter)])
                    .set(i64::try_from(c.value).unwrap_or(i64::MAX));
            }
        }
        self.refresh_access_age(cfg);
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Metrics {
    /// `access_state_age_seconds` as of now.
    fn refresh_access_age(&self, cfg: &Config) {
        use std::sync::atomic::Ordering;
        if cfg.access.etcd().is_none() {
            self.access_backend_connected.set(1);
            self.access_state_age_seconds.set(0.0);
            return;
        }
        let at = self.access_synced_at_ms.load(Ordering::Relaxed);
        let age = if at == 0 { -1.0 } else { (chrono::Utc::now().timestamp_millis() - at).max(0) as f64 / 1000.0 };
        self.access_state_age_seconds.set(age);
    }
}

/// Serve `GET /metrics` on `addr` (loopback; plain HTTP/1.1, one response per connection).
pub async fn serve(cfg: Arc<Config>, listener: tokio::net::TcpListener) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else { continue };
        let cfg = cfg.clone();
        tokio::spawn(async move {
            let mut req = Vec::with_capacity(512);
            let mut buf = [0u8; 512];
            // Read the request head (bounded); the body, if any, is ignored.
            while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
                match tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => req.extend_from_slice(&buf[..n]),
                    _ => return,
                }
            }
            let ok = req.starts_with(b"GET /metrics ") || req.starts_with(b"GET /metrics?");
            let (status, ctype, body) = if ok {
                let body = tokio::task::spawn_blocking(move || METRICS.render(&cfg)).await.unwrap_or_default();
                ("200 OK", "application/openmetrics-text; version=1.0.0; charset=utf-8", body)
            } else {
                ("404 Not Found", "text/plain", "try GET /metrics\n".to_string())
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(body.as_bytes()).await;
            let _ = s.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: EventKind) -> Event {
        Event { kind, denied: false, error: false, masked: 0 }
    }

    #[test]
    fn events_drive_the_counters() {
        let m = Metrics::new();
        m.event(Event { denied: true, ..event(EventKind::Statement) });
        m.event(event(EventKind::Statement));
        m.event(event(EventKind::Login));
        m.event(Event { error: true, ..event(EventKind::Result) });
        let mut text = String::new();
        encode(&mut text, &m.registry).unwrap();
        for want in [
            "pgward_statements_total 2",
            "pgward_statements_denied_total 1",
            "pgward_logins_total 1",
            "pgward_sessions_active 1",
            "pgward_statement_errors_total 1",
            "pgward_audit_records_total 4",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }
}
