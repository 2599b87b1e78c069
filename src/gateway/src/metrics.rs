//! The gateway's Prometheus metrics: SCSI and iSCSI counters, the volumes', the cluster
//! agent's and the fragment client's. They live in a registry of their own ([`registry`]),
//! which the binary serves at `/metrics` together with the rest of the process's (README
//! lists every metric).
//!
//! Hot paths touch only atomics: the SCSI counters and histograms are updated where a command
//! completes. State that lives elsewhere (the volumes' counters, fill progress, sessions) is
//! read when scraped, by [`Gateway::refresh_metrics`](crate::Gateway::refresh_metrics).

use std::net::SocketAddr;
use std::sync::OnceLock;

use prometheus::{
    Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry,
};

/// Every metric of the gateway.
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
}

/// Latency buckets (seconds): 50 µs to 10 s.
pub const BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 10.0,
];

/// `m`, registered in `r`.
pub fn registered<M: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: M) -> M {
    r.register(Box::new(m.clone())).expect("unique metric");
    m
}

/// A gauge registered in `r`.
pub fn int_gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    registered(r, IntGauge::new(name, help).expect("valid metric"))
}

/// A counter registered in `r`.
pub fn int_counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    registered(r, IntCounter::new(name, help).expect("valid metric"))
}

/// A counter family registered in `r`.
pub fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    registered(
        r,
        IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
    )
}

/// A gauge family registered in `r`.
pub fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    registered(
        r,
        IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
    )
}

/// A latency histogram family (buckets 50 µs to 10 s) registered in `r`.
pub fn histogram_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let opts = HistogramOpts::new(name, help).buckets(BUCKETS.to_vec());
    registered(r, HistogramVec::new(opts, labels).expect("valid metric"))
}

impl Metrics {
    fn new() -> Self {
        let r = Registry::new();
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
            iscsi_sessions: int_gauge(&r, "tessera_iscsi_sessions", "Live iSCSI sessions."),
            iscsi_connections: int_gauge(&r, "tessera_iscsi_connections", "Open iSCSI connections."),
            iscsi_login_failures: counter_vec(
                &r,
                "tessera_iscsi_login_failures_total",
                "Failed iSCSI logins.",
                &["reason"],
            ),
            iscsi_digest_errors: int_counter(
                &r,
                "tessera_iscsi_digest_errors_total",
                "PDUs whose header or data digest did not match.",
            ),
            iscsi_rejects: int_counter(&r, "tessera_iscsi_rejects_total", "Reject PDUs sent."),
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
                &r,
                "tessera_cluster_lease_held",
                "1 while the gateway holds a cluster lease in etcd.",
            ),
            cluster_lease_age: lease_age,
            cluster_volumes_owned: int_gauge(
                &r,
                "tessera_cluster_volumes_owned",
                "Volumes this gateway owns.",
            ),
            cluster_etcd_reachable: int_gauge(
                &r,
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
            registry: r,
        }
    }

    /// The registry holding every gateway metric.
    pub fn registry(&self) -> &Registry {
        &self.registry
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
/// The gateway's metrics.
pub fn metrics() -> &'static Metrics {
    METRICS.get_or_init(Metrics::new)
}

/// The registry holding every gateway metric (for the process's `/metrics`).
pub fn registry() -> &'static Registry {
    metrics().registry()
}
