//! Prometheus metrics: one text exposition per process, served at `http://ADDR/metrics`
//! (`[gateway] metrics` / `[node] metrics`, `tessera node --metrics`). It holds the gateway's
//! registry ([`tessera_gateway::metrics`]) and this module's: the storage node's and the
//! process's io_uring counters. Counters count from the process's start; names follow
//! Prometheus conventions (base units, `_total` for counters). README lists every metric.
//!
//! State that lives elsewhere (the store's counters, the volumes') is read when scraped, by
//! the refresh hook the daemon installs ([`set_refresh`]).

use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};

use prometheus::{
    Encoder, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry, TextEncoder,
};
pub use tessera_gateway::metrics::catch_up;
use tessera_gateway::metrics::{counter_vec, gauge_vec, histogram_vec, int_counter, int_gauge};
use tracing::{info, warn};

/// The storage node's metrics and the process's io_uring counters.
pub struct Metrics {
    registry: Registry,
    /// io_uring operations submitted, completed, `io_uring_enter` calls, synchronous
    /// fallbacks (process-wide, read at scrape).
    pub uring_submissions: IntCounter,
    /// See `uring_submissions`.
    pub uring_completions: IntCounter,
    /// See `uring_submissions`.
    pub uring_enters: IntCounter,
    /// See `uring_submissions`.
    pub uring_sync_ops: IntCounter,
    /// io_uring operations submitted and not yet completed (the rings' queue depth).
    pub uring_in_flight: IntGauge,
    /// Storage node: fragment requests served, by operation.
    pub node_requests: IntCounterVec,
    /// Storage node: fragment request latency, by operation.
    pub node_request_duration: HistogramVec,
    /// Storage node: counters of the store (reads, writes, checksum errors, ...).
    pub node_events: IntCounterVec,
    /// Storage node: bytes of the store, allocated and capacity.
    pub node_store_bytes: IntGaugeVec,
    /// Storage node: 1 once the store failed a write or sync (fail-stop until restarted).
    pub node_store_failed: IntGauge,
}

impl Metrics {
    fn new() -> Self {
        let r = Registry::new();
        Self {
            uring_submissions: int_counter(
                &r,
                "tessera_uring_submissions_total",
                "Operations queued to the process's io_uring rings.",
            ),
            uring_completions: int_counter(
                &r,
                "tessera_uring_completions_total",
                "Completions reaped from the process's io_uring rings.",
            ),
            uring_enters: int_counter(
                &r,
                "tessera_uring_enters_total",
                "io_uring_enter system calls made to submit or to reap.",
            ),
            uring_sync_ops: int_counter(
                &r,
                "tessera_uring_sync_operations_total",
                "Disk operations done as plain system calls (no ring, or the synchronous fallback).",
            ),
            uring_in_flight: int_gauge(
                &r,
                "tessera_uring_operations_in_flight",
                "io_uring operations submitted and not yet completed (the rings' queue depth).",
            ),
            node_requests: counter_vec(
                &r,
                "tessera_node_requests_total",
                "Fragment protocol requests served, by operation and outcome.",
                &["op", "outcome"],
            ),
            node_request_duration: histogram_vec(
                &r,
                "tessera_node_request_duration_seconds",
                "Time to serve a fragment protocol request.",
                &["op"],
            ),
            node_events: counter_vec(
                &r,
                "tessera_node_events_total",
                "Storage node store events: fragment_read, fragment_write, checksum_error, stale_epoch_reject.",
                &["event"],
            ),
            node_store_bytes: gauge_vec(
                &r,
                "tessera_node_store_bytes",
                "Bytes of the node's store (kind: capacity, allocated).",
                &["kind"],
            ),
            node_store_failed: int_gauge(
                &r,
                "tessera_node_store_failed",
                "1 once the node's store failed a write or sync: it refuses writes until restarted and its fragments are rebuilt elsewhere.",
            ),
            registry: r,
        }
    }

    /// The text exposition of every metric of the process (after the refresh hook ran).
    pub fn render(&self) -> String {
        if let Some(f) = REFRESH.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            f();
        }
        let t = tessera_uring::engine_totals();
        catch_up(&self.uring_submissions, t.submitted);
        catch_up(&self.uring_completions, t.completed);
        catch_up(&self.uring_enters, t.enters);
        catch_up(&self.uring_sync_ops, t.sync_ops);
        self.uring_in_flight.set(t.in_flight() as i64);
        let mut families = tessera_gateway::metrics::registry().gather();
        families.extend(self.registry.gather());
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
            warn!("encoding metrics: {e}");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

static METRICS: OnceLock<Metrics> = OnceLock::new();
type Refresh = Box<dyn Fn() + Send + Sync>;
static REFRESH: Mutex<Option<Refresh>> = Mutex::new(None);

/// The node's and the process's metrics (the gateway's: [`tessera_gateway::metrics::metrics`]).
pub fn metrics() -> &'static Metrics {
    METRICS.get_or_init(Metrics::new)
}

/// Install the hook that brings state kept elsewhere into the metrics before each scrape.
pub fn set_refresh(f: impl Fn() + Send + Sync + 'static) {
    *REFRESH.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(f));
}

/// Serve `GET /metrics` at `addr` from a thread of its own; returns the bound address.
pub fn serve(addr: SocketAddr) -> anyhow::Result<SocketAddr> {
    let server = tiny_http::Server::http(addr)
        .map_err(|e| anyhow::anyhow!("binding the metrics listener {addr}: {e}"))?;
    let bound = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| anyhow::anyhow!("the metrics listener has no IP address"))?;
    std::thread::Builder::new()
        .name("tessera-metrics".into())
        .spawn(move || {
            for req in server.incoming_requests() {
                let path = req.url().split('?').next().unwrap_or("").to_string();
                let r = if path == "/metrics" && *req.method() == tiny_http::Method::Get {
                    let body = metrics().render();
                    let ct = tiny_http::Header::from_bytes(
                        &b"Content-Type"[..],
                        &b"text/plain; version=0.0.4; charset=utf-8"[..],
                    )
                    .expect("valid header");
                    req.respond(tiny_http::Response::from_string(body).with_header(ct))
                } else {
                    req.respond(
                        tiny_http::Response::from_string("only GET /metrics here\n")
                            .with_status_code(404),
                    )
                };
                if let Err(e) = r {
                    tracing::debug!("metrics answer: {e}");
                }
            }
        })?;
    info!(%bound, "metrics at http://{bound}/metrics");
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readme_lists_every_metric() {
        let src = [
            include_str!("metrics.rs"),
            include_str!("../../gateway/src/metrics.rs"),
        ]
        .concat();
        let readme = include_str!("../../../README.md");
        let mut names: Vec<&str> = src
            .split('"')
            .filter(|w| {
                w.starts_with("tessera_")
                    && w.len() > 8
                    && w.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                    && !w.ends_with("_bucket")
            })
            .collect();
        names.sort_unstable();
        names.dedup();
        assert!(names.len() >= 30, "{names:?}");
        let missing: Vec<&&str> = names
            .iter()
            .filter(|n| !readme.contains(&format!("`{n}`")))
            .collect();
        assert!(missing.is_empty(), "README lacks {missing:?}");
    }

    #[test]
    fn the_exposition_names_every_family_and_serves_over_http() {
        let m = tessera_gateway::metrics::metrics();
        m.scsi_commands
            .with_label_values(&["iqn.t", "0", "read"])
            .inc();
        m.scsi_duration
            .with_label_values(&["iqn.t", "0", "read"])
            .observe(0.001);
        let c = m.volume_events.with_label_values(&["v", "degraded_read"]);
        catch_up(&c, 5);
        catch_up(&c, 3);
        assert_eq!(c.get(), 5, "catch_up never lowers a counter");
        let text = metrics().render();
        assert!(
            text.contains(
                "tessera_scsi_commands_total{kind=\"read\",lun=\"0\",target=\"iqn.t\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("tessera_scsi_command_duration_seconds_bucket"));
        assert!(text.contains("# TYPE tessera_iscsi_sessions gauge"));
        assert!(text.contains("# TYPE tessera_uring_submissions_total counter"));
        let addr = serve("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        use std::io::{Read, Write};
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        assert!(
            body.starts_with("HTTP/1.1 200") || body.starts_with("HTTP/1.0 200"),
            "{body}"
        );
        assert!(body.contains("tessera_volume_events_total"), "{body}");
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /other HTTP/1.0\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        assert!(body.contains(" 404"), "{body}");
    }
}
