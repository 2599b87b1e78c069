//! Prometheus metrics: one registry per process, served as text at `http://ADDR/metrics`
//! (`[gateway] metrics` / `[node] metrics`, `tessera node --metrics`). Counters count from the
//! process's start; names follow Prometheus conventions (base units, `_total` for counters).
//! README lists every metric.
//!
//! Hot paths touch only atomics: the SCSI counters and histograms are updated where a command
//! completes. State that lives elsewhere (the volumes' counters, fill progress, sessions) is
//! read when scraped, by the refresh hook the daemon installs ([`set_refresh`]).

use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};

use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tracing::{info, warn};

/// Every metric of the process.
pub struct Metrics {
    registry: Registry,
    /// SCSI commands completed, by target, LUN and kind (`read`, `write`, `other`).
    pub scsi_commands: IntCounterVec,
    /// Bytes moved by SCSI commands, by target, LUN and direction (`read`, `write`).
    pub scsi_bytes: IntCounterVec,
    /// SCSI command latency, by target, LUN and kind.
    pub scsi_duration: HistogramVec,
    /// Commands answered CHECK CONDITION, by target, LUN and sense key.
    pub scsi_check_conditions: IntCounterVec,
    /// Commands in flight, by target and LUN (the queue depth initiators keep).
    pub scsi_in_flight: IntGaugeVec,
    /// Live iSCSI sessions.
    pub iscsi_sessions: IntGauge,
    /// Open iSCSI connections.
    pub iscsi_connections: IntGauge,
    /// Failed logins, by reason.
    pub iscsi_login_failures: IntCounterVec,
    /// Header and data digest errors.
    pub iscsi_digest_errors: IntCounter,
    /// Reject PDUs sent.
    pub iscsi_rejects: IntCounter,
    /// Erasure-coded volume events, by volume and event.
    pub volume_events: IntCounterVec,
    /// The fencing epoch each volume is written with here.
    pub volume_epoch: IntGaugeVec,
    /// 1 while the volume is fenced here (it no longer writes).
    pub volume_fenced: IntGaugeVec,
    /// Stripes of the volume a rebuild (fill) must check, and has checked.
    pub rebuild_stripes: IntGaugeVec,
    /// Stripes checked by the volume's current or last rebuild.
    pub rebuild_done_stripes: IntGaugeVec,
    /// Bytes the volume's current or last rebuild wrote.
    pub rebuild_written_bytes: IntGaugeVec,
    /// The rebuild's average write rate.
    pub rebuild_rate: GaugeVec,
    /// 1 while the volume is rebuilding.
    pub rebuild_active: IntGaugeVec,
    /// 1 while the gateway holds a cluster lease.
    pub cluster_lease_held: IntGauge,
    /// Seconds since the lease was last renewed (from when the renewal was sent).
    pub cluster_lease_age: Gauge,
    /// Volumes this gateway owns.
    pub cluster_volumes_owned: IntGauge,
    /// 1 while the gateway's last exchange with etcd (a lease renewal) is recent.
    pub cluster_etcd_reachable: IntGauge,
    /// PGs with a position on a node that may lack writes, by volume.
    pub volume_degraded_pgs: IntGaugeVec,
    /// PGs with a position being rebuilt onto a new node, by volume.
    pub volume_rebuilding_pgs: IntGaugeVec,
    /// Nodes of the volume that may lack writes.
    pub volume_stale_nodes: IntGaugeVec,
    /// Nodes of a volume that nothing waits for (down) or that reads go around (slow).
    pub volume_unresponsive_nodes: IntGaugeVec,
    /// Stripes with a damaged or missing fragment waiting to be rewritten.
    pub volume_repair_stripes: IntGaugeVec,
    /// PGs of a volume that cannot take writes (too few of their nodes answer).
    pub volume_write_suspended_pgs: IntGaugeVec,
    /// Gateway: fragment protocol calls to storage nodes, by node, operation and outcome.
    pub fragment_requests: IntCounterVec,
    /// Gateway: fragment protocol call latency, by node and operation.
    pub fragment_request_duration: HistogramVec,
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

/// Latency buckets (seconds): 50 µs to 10 s.
const BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 10.0,
];

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn histogram_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(BUCKETS.to_vec()),
        labels,
    )
    .expect("valid metric");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

impl Metrics {
    fn new() -> Self {
        let r = Registry::new();
        let int_gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            r.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let int_counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            r.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let lease_age = Gauge::new(
            "tessera_cluster_lease_age_seconds",
            "Seconds since the gateway's cluster lease was last renewed (counted from when the renewal was sent).",
        )
        .expect("valid metric");
        r.register(Box::new(lease_age.clone()))
            .expect("unique metric");
        let rate = GaugeVec::new(
            Opts::new(
                "tessera_volume_rebuild_rate_bytes_per_second",
                "Average write rate of the volume's current or last rebuild.",
            ),
            &["volume"],
        )
        .expect("valid metric");
        r.register(Box::new(rate.clone())).expect("unique metric");
        Self {
            scsi_commands: counter_vec(
                &r,
                "tessera_scsi_commands_total",
                "SCSI commands completed.",
                &["target", "lun", "kind"],
            ),
            scsi_bytes: counter_vec(
                &r,
                "tessera_scsi_bytes_total",
                "Bytes read or written by SCSI commands.",
                &["target", "lun", "direction"],
            ),
            scsi_duration: histogram_vec(
                &r,
                "tessera_scsi_command_duration_seconds",
                "Time from a SCSI command's arrival to its completion.",
                &["target", "lun", "kind"],
            ),
            scsi_check_conditions: counter_vec(
                &r,
                "tessera_scsi_check_conditions_total",
                "SCSI commands answered CHECK CONDITION, by sense key.",
                &["target", "lun", "sense_key"],
            ),
            scsi_in_flight: gauge_vec(
                &r,
                "tessera_scsi_commands_in_flight",
                "SCSI commands being executed (the queue depth).",
                &["target", "lun"],
            ),
            iscsi_sessions: int_gauge("tessera_iscsi_sessions", "Live iSCSI sessions."),
            iscsi_connections: int_gauge("tessera_iscsi_connections", "Open iSCSI connections."),
            iscsi_login_failures: counter_vec(
                &r,
                "tessera_iscsi_login_failures_total",
                "Failed iSCSI logins.",
                &["reason"],
            ),
            iscsi_digest_errors: int_counter(
                "tessera_iscsi_digest_errors_total",
                "PDUs whose header or data digest did not match.",
            ),
            iscsi_rejects: int_counter("tessera_iscsi_rejects_total", "Reject PDUs sent."),
            volume_events: counter_vec(
                &r,
                "tessera_volume_events_total",
                "Erasure-coded volume events: degraded_read, repaired_fragment, checksum_error, rolled_forward, rolled_back, degraded_write, suspended_write (a write that failed after waiting for its quorum), trimmed_fragment (deleted from a node a position left).",
                &["volume", "event"],
            ),
            volume_epoch: gauge_vec(
                &r,
                "tessera_volume_epoch",
                "The fencing epoch the volume is written with here.",
                &["volume"],
            ),
            volume_fenced: gauge_vec(
                &r,
                "tessera_volume_fenced",
                "1 while the volume is fenced here (a newer owner exists, or the lease lapsed).",
                &["volume"],
            ),
            rebuild_stripes: gauge_vec(
                &r,
                "tessera_volume_rebuild_stripes",
                "Stripes the volume's current or last rebuild checks.",
                &["volume"],
            ),
            rebuild_done_stripes: gauge_vec(
                &r,
                "tessera_volume_rebuild_done_stripes",
                "Stripes the volume's current or last rebuild has checked.",
                &["volume"],
            ),
            rebuild_written_bytes: gauge_vec(
                &r,
                "tessera_volume_rebuild_written_bytes",
                "Bytes the volume's current or last rebuild wrote to new nodes.",
                &["volume"],
            ),
            rebuild_rate: rate,
            rebuild_active: gauge_vec(
                &r,
                "tessera_volume_rebuild_active",
                "1 while the volume has moved fragment positions left to rebuild.",
                &["volume"],
            ),
            cluster_lease_held: int_gauge(
                "tessera_cluster_lease_held",
                "1 while the gateway holds a cluster lease in etcd.",
            ),
            cluster_lease_age: lease_age,
            cluster_volumes_owned: int_gauge(
                "tessera_cluster_volumes_owned",
                "Volumes this gateway owns.",
            ),
            cluster_etcd_reachable: int_gauge(
                "tessera_cluster_etcd_reachable",
                "1 while the gateway's last lease renewal with etcd is recent (within two renewal intervals).",
            ),
            volume_degraded_pgs: gauge_vec(
                &r,
                "tessera_volume_degraded_pgs",
                "PGs with a fragment position on a node that may lack writes (it missed some while away).",
                &["volume"],
            ),
            volume_rebuilding_pgs: gauge_vec(
                &r,
                "tessera_volume_rebuilding_pgs",
                "PGs with a fragment position being rebuilt onto a node new to it.",
                &["volume"],
            ),
            volume_stale_nodes: gauge_vec(
                &r,
                "tessera_volume_stale_nodes",
                "Storage nodes of the volume that may lack writes.",
                &["volume"],
            ),
            volume_unresponsive_nodes: gauge_vec(
                &r,
                "tessera_volume_unresponsive_nodes",
                "Nodes of the volume that do not answer (condition: down: skipped until a probe answers; slow: reads go around them).",
                &["volume", "condition"],
            ),
            volume_repair_stripes: gauge_vec(
                &r,
                "tessera_volume_repair_stripes",
                "Stripes with a damaged or missing fragment waiting to be rewritten.",
                &["volume"],
            ),
            volume_write_suspended_pgs: gauge_vec(
                &r,
                "tessera_volume_write_suspended_pgs",
                "PGs of the volume that cannot take writes: fewer of their nodes answer than the write quorum (writes wait, then fail with NOT READY).",
                &["volume"],
            ),
            fragment_requests: counter_vec(
                &r,
                "tessera_fragment_requests_total",
                "Fragment protocol calls from this gateway to storage nodes, by outcome (ok, unreachable, timeout, stale_epoch, refused, malformed).",
                &["node", "op", "outcome"],
            ),
            fragment_request_duration: histogram_vec(
                &r,
                "tessera_fragment_request_duration_seconds",
                "Time from sending a fragment protocol call to a storage node to its answer.",
                &["node", "op"],
            ),
            uring_submissions: int_counter(
                "tessera_uring_submissions_total",
                "Operations queued to the process's io_uring rings.",
            ),
            uring_completions: int_counter(
                "tessera_uring_completions_total",
                "Completions reaped from the process's io_uring rings.",
            ),
            uring_enters: int_counter(
                "tessera_uring_enters_total",
                "io_uring_enter system calls made to submit or to reap.",
            ),
            uring_sync_ops: int_counter(
                "tessera_uring_sync_operations_total",
                "Disk operations done as plain system calls (no ring, or the synchronous fallback).",
            ),
            uring_in_flight: int_gauge(
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
                "tessera_node_store_failed",
                "1 once the node's store failed a write or sync: it refuses writes until restarted and its fragments are rebuilt elsewhere.",
            ),
            registry: r,
        }
    }

    /// The text exposition of every metric (after the refresh hook ran).
    pub fn render(&self) -> String {
        if let Some(f) = REFRESH.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            f();
        }
        let t = tessera_store::engine_totals();
        catch_up(&self.uring_submissions, t.submitted);
        catch_up(&self.uring_completions, t.completed);
        catch_up(&self.uring_enters, t.enters);
        catch_up(&self.uring_sync_ops, t.sync_ops);
        self.uring_in_flight.set(t.in_flight() as i64);
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            warn!("encoding metrics: {e}");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Raise counter `c` to `v` (a monotonic count kept elsewhere).
pub fn catch_up(c: &IntCounter, v: u64) {
    let cur = c.get();
    if v > cur {
        c.inc_by(v - cur);
    }
}

/// Counts and times the gateway's calls to storage nodes ([`Metrics::fragment_requests`],
/// [`Metrics::fragment_request_duration`]). Label lookups are cached per thread.
pub struct FragmentCalls;

type CallHandles = (prometheus::Histogram, IntCounter);

thread_local! {
    static CALLS: std::cell::RefCell<std::collections::HashMap<(SocketAddr, u8), CallHandles>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

fn outcome(e: &tessera_rpc::CallError) -> &'static str {
    use tessera_rpc::CallError as E;
    match e {
        E::Unreachable { .. } => "unreachable",
        E::Timeout(_) => "timeout",
        E::StaleEpoch { .. } => "stale_epoch",
        E::Status { .. } => "refused",
        E::Protocol { .. } => "malformed",
    }
}

impl tessera_volume::nodes::CallObserver for FragmentCalls {
    fn observe(
        &self,
        addr: SocketAddr,
        op: tessera_rpc::Op,
        elapsed: std::time::Duration,
        result: Result<(), &tessera_rpc::CallError>,
    ) {
        let m = metrics();
        CALLS.with(|c| {
            let mut c = c.borrow_mut();
            let (h, ok) = c.entry((addr, op.0)).or_insert_with(|| {
                let node = addr.to_string();
                (
                    m.fragment_request_duration
                        .with_label_values(&[node.as_str(), op.name()]),
                    m.fragment_requests
                        .with_label_values(&[node.as_str(), op.name(), "ok"]),
                )
            });
            h.observe(elapsed.as_secs_f64());
            match result {
                Ok(()) => ok.inc(),
                Err(e) => m
                    .fragment_requests
                    .with_label_values(&[addr.to_string().as_str(), op.name(), outcome(e)])
                    .inc(),
            }
        });
    }
}

static METRICS: OnceLock<Metrics> = OnceLock::new();
type Refresh = Box<dyn Fn() + Send + Sync>;
static REFRESH: Mutex<Option<Refresh>> = Mutex::new(None);

/// The process's metrics.
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
        let src = include_str!("metrics.rs");
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
        let m = metrics();
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
        let text = m.render();
        assert!(
            text.contains(
                "tessera_scsi_commands_total{kind=\"read\",lun=\"0\",target=\"iqn.t\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("tessera_scsi_command_duration_seconds_bucket"));
        assert!(text.contains("# TYPE tessera_iscsi_sessions gauge"));
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
