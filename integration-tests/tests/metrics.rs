//! `/metrics` of the gateway and the storage nodes, scraped over HTTP from a running
//! `tessera demo --backend ec` (whose demo.json names each process's metrics address): the
//! expected series exist, and they move when an initiator writes and reads.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tessera_integration_tests::images::{compare, convert, random_file};
use tessera_integration_tests::{free_port, http_get, require_tool, url_encode, Demo, Started};

/// GET http://addr/metrics: the samples, by series (`name{labels}`).
fn scrape(addr: &str) -> HashMap<String, f64> {
    let a: SocketAddr = addr.parse().expect("metrics address");
    let mut s = TcpStream::connect_timeout(&a, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(
        head.starts_with("HTTP/1.") && head.contains(" 200"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain"),
        "{head}"
    );
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// The sum of every series of metric `name` whose labels include all of `labels`.
fn sum(m: &HashMap<String, f64>, name: &str, labels: &[&str]) -> f64 {
    m.iter()
        .filter(|(k, _)| {
            (k.as_str() == name || k.starts_with(&format!("{name}{{")))
                && labels.iter().all(|l| k.contains(l))
        })
        .map(|(_, v)| v)
        .sum()
}

fn has(m: &HashMap<String, f64>, name: &str) -> bool {
    m.keys()
        .any(|k| k == name || k.starts_with(&format!("{name}{{")))
}

#[test]
fn gateway_and_node_metrics_exist_and_move_with_io() {
    require_tool("qemu-img", "qemu-utils and qemu-block-extra");
    let demo = Demo::start(&["--backend", "ec", "--ec", "4+2", "--size", "32MiB"]);
    let gw = demo.metrics_addrs("gateway").remove(0);
    let nodes = demo.metrics_addrs("node");
    assert_eq!(nodes.len(), 6);
    assert_eq!(
        demo.metrics_addrs("etcd").len(),
        1,
        "etcd's metrics address is listed too"
    );

    let before = scrape(&gw);
    let node_before = scrape(&nodes[0]);
    for name in [
        "tessera_iscsi_sessions",
        "tessera_iscsi_connections",
        "tessera_iscsi_digest_errors_total",
        "tessera_cluster_lease_held",
        "tessera_cluster_lease_age_seconds",
        "tessera_cluster_volumes_owned",
        "tessera_volume_epoch",
        "tessera_volume_fenced",
        "tessera_volume_rebuild_active",
        "tessera_volume_degraded_pgs",
        "tessera_volume_rebuilding_pgs",
        "tessera_cluster_etcd_reachable",
    ] {
        assert!(has(&before, name), "gateway lacks {name}: {before:?}");
    }
    assert_eq!(sum(&before, "tessera_cluster_lease_held", &[]), 1.0);
    assert_eq!(sum(&before, "tessera_cluster_etcd_reachable", &[]), 1.0);
    assert_eq!(sum(&before, "tessera_volume_degraded_pgs", &[]), 0.0);
    assert!(sum(&before, "tessera_volume_epoch", &["volume=\"demo\""]) >= 1.0);
    for name in [
        "tessera_node_store_bytes",
        "tessera_node_events_total",
        "tessera_uring_submissions_total",
        "tessera_uring_operations_in_flight",
    ] {
        assert!(
            has(&node_before, name),
            "node lacks {name}: {node_before:?}"
        );
    }

    let src = demo.dir.path().join("src.img");
    random_file(&src, 8, 0x3e7);
    convert(&src, &demo.url(0));
    assert!(compare(&src, &demo.url(0)));
    std::thread::sleep(Duration::from_millis(1500)); // nodes refresh their store counters each second

    let after = scrape(&gw);
    let w = |m: &HashMap<String, f64>| sum(m, "tessera_scsi_bytes_total", &["direction=\"write\""]);
    let r = |m: &HashMap<String, f64>| sum(m, "tessera_scsi_bytes_total", &["direction=\"read\""]);
    println!(
        "gateway: {} bytes written, {} read, {} write commands; latency count {}",
        w(&after) - w(&before),
        r(&after) - r(&before),
        sum(&after, "tessera_scsi_commands_total", &["kind=\"write\""]),
        sum(
            &after,
            "tessera_scsi_command_duration_seconds_count",
            &["kind=\"write\""]
        )
    );
    assert!(
        w(&after) - w(&before) >= (8 << 20) as f64,
        "write bytes did not move"
    );
    assert!(
        r(&after) - r(&before) >= (8 << 20) as f64,
        "read bytes did not move"
    );
    assert!(
        sum(
            &after,
            "tessera_scsi_commands_total",
            &["kind=\"write\"", "lun=\"0\""]
        ) > sum(
            &before,
            "tessera_scsi_commands_total",
            &["kind=\"write\"", "lun=\"0\""]
        )
    );
    assert!(
        sum(
            &after,
            "tessera_scsi_command_duration_seconds_count",
            &["kind=\"read\""]
        ) > 0.0
    );
    // The gateway's side of the fragment protocol, per node.
    let calls = |m: &HashMap<String, f64>| {
        sum(
            m,
            "tessera_fragment_requests_total",
            &["op=\"write\"", "outcome=\"ok\""],
        )
    };
    let timed = sum(
        &after,
        "tessera_fragment_request_duration_seconds_count",
        &["op=\"read\""],
    );
    println!(
        "gateway: {} fragment writes ok, {timed} fragment reads timed",
        calls(&after) - calls(&before)
    );
    assert!(
        calls(&after) > calls(&before),
        "fragment calls did not move"
    );
    assert!(timed > 0.0, "fragment reads were not timed");
    let node_after = scrape(&nodes[0]);
    // The node's disk engine: operations went through it (io_uring, or the synchronous
    // fallback where the kernel refuses a ring).
    let disk = |m: &HashMap<String, f64>| {
        sum(m, "tessera_uring_submissions_total", &[])
            + sum(m, "tessera_uring_sync_operations_total", &[])
    };
    println!(
        "node 0: {} disk operations ({} through io_uring), {} in flight",
        disk(&node_after) - disk(&node_before),
        sum(&node_after, "tessera_uring_submissions_total", &[]),
        sum(&node_after, "tessera_uring_operations_in_flight", &[])
    );
    assert!(
        disk(&node_after) > disk(&node_before),
        "disk operations did not move"
    );
    let nw = |m: &HashMap<String, f64>| sum(m, "tessera_node_requests_total", &["op=\"write\""]);
    println!(
        "node 0: {} write requests, {} fragments written",
        nw(&node_after) - nw(&node_before),
        sum(
            &node_after,
            "tessera_node_events_total",
            &["event=\"fragment_write\""]
        )
    );
    assert!(
        nw(&node_after) > nw(&node_before),
        "node write requests did not move"
    );
    assert!(
        sum(
            &node_after,
            "tessera_node_events_total",
            &["event=\"fragment_write\""]
        ) > 0.0,
        "node fragment writes did not move"
    );
    assert!(
        sum(
            &node_after,
            "tessera_node_request_duration_seconds_count",
            &["op=\"write\""]
        ) > 0.0
    );

    // A node down: writes go on degraded, the calls to it fail, PGs using it are degraded.
    demo.kill_node(5);
    let part = demo.dir.path().join("part.img");
    random_file(&part, 2, 0x3e8);
    convert(&part, &demo.url(0));
    let down = scrape(&gw);
    let failed = sum(&down, "tessera_fragment_requests_total", &[])
        - sum(
            &down,
            "tessera_fragment_requests_total",
            &["outcome=\"ok\""],
        );
    let degraded = sum(&down, "tessera_volume_degraded_pgs", &["volume=\"demo\""]);
    println!("node 5 down: {failed} failed fragment calls, {degraded} degraded PGs");
    assert!(
        failed > 0.0,
        "calls to the dead node were not counted as failed"
    );
    assert!(degraded > 0.0, "no PG is counted degraded with a node down");
    assert!(demo.stop());
}

/// A real Prometheus server (Debian's `prometheus`) scrapes a gateway and a storage node:
/// both expositions pass `promtool check metrics`, the targets are up, and the series exist
/// and move with I/O when asked through Prometheus's HTTP API.
#[test]
fn a_prometheus_server_scrapes_the_gateway_and_a_node() {
    require_tool("prometheus", "prometheus");
    require_tool("promtool", "prometheus");
    require_tool("qemu-img", "qemu-utils and qemu-block-extra");
    let demo = Demo::start(&["--backend", "ec", "--ec", "4+2", "--size", "32MiB"]);
    let (gw, node) = (
        demo.metrics_addrs("gateway").remove(0),
        demo.metrics_addrs("node").remove(0),
    );

    // promtool's linter on both expositions (names, units, help, types).
    for (what, addr) in [("gateway", &gw), ("node", &node)] {
        let (code, body) = http_get(addr, "/metrics");
        assert_eq!(code, 200);
        let mut child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("promtool");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(body.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        println!(
            "promtool check metrics ({what}): {}",
            if said.trim().is_empty() {
                "clean"
            } else {
                said.trim()
            }
        );
        assert!(
            out.status.success() && said.trim().is_empty(),
            "{what}: {said}"
        );
    }

    let dir = demo.dir.path().join("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
             scrape_configs:\n\
             \x20 - job_name: tessera-gateway\n    static_configs:\n      - targets: ['{gw}']\n\
             \x20 - job_name: tessera-node\n    static_configs:\n      - targets: ['{node}']\n"
        ),
    )
    .unwrap();
    let check = Command::new("promtool")
        .args(["check", "config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let web = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let _prom = Started(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("prometheus"),
    );
    let prom_log = || std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default();
    let api = |path: &str| -> serde_json::Value {
        let (code, body) = http_get(&web, path);
        assert_eq!(code, 200, "{path}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("JSON from Prometheus");
        assert_eq!(v["status"], "success", "{path}: {body}");
        v
    };
    // The value of a query that yields one sample, if it does.
    let query = |expr: &str| -> Option<f64> {
        let v = api(&format!("/api/v1/query?query={}", url_encode(expr)));
        let r = v["data"]["result"].as_array()?.first()?.clone();
        r["value"][1].as_str()?.parse().ok()
    };
    let wait = |what: &str, mut ok: Box<dyn FnMut() -> bool + '_>| {
        let t = Instant::now();
        while !ok() {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "{what}: not within 60 s; prometheus log:\n{}",
                prom_log()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        println!("{:>5.1} s  {what}", t.elapsed().as_secs_f64());
    };
    // Ready, both targets scraped and up.
    wait(
        "prometheus ready",
        Box::new(|| TcpStream::connect(&web).is_ok() && http_get(&web, "/-/ready").0 == 200),
    );
    wait(
        "both targets up",
        Box::new(|| {
            let v = api("/api/v1/targets");
            let t = v["data"]["activeTargets"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            t.len() == 2 && t.iter().all(|t| t["health"] == "up")
        }),
    );
    let gw_series =
        query(r#"count({job="tessera-gateway", __name__=~"tessera_.+"})"#).unwrap_or(0.0);
    let node_series =
        query(r#"count({job="tessera-node", __name__=~"tessera_.+"})"#).unwrap_or(0.0);
    println!("series: gateway {gw_series}, node {node_series}");
    assert!(gw_series >= 20.0 && node_series >= 10.0, "too few series");
    assert_eq!(
        query(r#"tessera_cluster_lease_held{job="tessera-gateway"}"#),
        Some(1.0)
    );

    // A first write creates the per-node fragment series; rates need them scraped before
    // the I/O that moves them.
    let warm = demo.dir.path().join("warm.img");
    random_file(&warm, 1, 0x9e6);
    convert(&warm, &demo.url(0));
    std::thread::sleep(Duration::from_millis(2500));
    let written = r#"sum(tessera_scsi_bytes_total{job="tessera-gateway", direction="write"})"#;
    let node_writes = r#"sum(tessera_node_requests_total{job="tessera-node", op="write"})"#;
    let before = (
        query(written).unwrap_or(0.0),
        query(node_writes).unwrap_or(0.0),
    );
    let src = demo.dir.path().join("src.img");
    random_file(&src, 8, 0x9e7);
    convert(&src, &demo.url(0));
    assert!(compare(&src, &demo.url(0)));
    wait(
        "write bytes seen by prometheus",
        Box::new(|| query(written).unwrap_or(0.0) >= before.0 + (8 << 20) as f64),
    );
    wait(
        "node write requests seen by prometheus",
        Box::new(|| query(node_writes).unwrap_or(0.0) > before.1),
    );
    // Rates and histogram quantiles, as a dashboard asks for them.
    let p99 = query(
        r#"histogram_quantile(0.99, sum by (le) (rate(tessera_scsi_command_duration_seconds_bucket{job="tessera-gateway", kind="write"}[1m])))"#,
    );
    let rate = query(r#"sum(rate(tessera_fragment_requests_total{job="tessera-gateway"}[1m]))"#);
    println!("write p99 {p99:?} s, fragment calls {rate:?}/s");
    assert!(p99.is_some_and(|v| v > 0.0), "no write latency quantile");
    assert!(rate.is_some_and(|v| v > 0.0), "no fragment call rate");

    // The Grafana dashboard's every query is valid PromQL on these series, and the core
    // panels show data.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("grafana/tessera-dashboard.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let mut with_data = Vec::new();
    let mut queries = 0;
    for p in dash["panels"].as_array().expect("panels") {
        let title = p["title"].as_str().unwrap_or("");
        for t in p["targets"].as_array().cloned().unwrap_or_default() {
            let expr = t["expr"].as_str().expect("a PromQL expression");
            for name in expr.split(|c: char| !(c.is_ascii_lowercase() || c == '_')) {
                let base = name.trim_end_matches("_bucket");
                if base.starts_with("tessera_") {
                    assert!(
                        readme.contains(&format!("`{base}`")),
                        "panel {title:?} uses {base}, which README does not list"
                    );
                }
            }
            let q = expr
                .replace("$__rate_interval", "1m")
                .replace("$volume", ".*");
            let v = api(&format!("/api/v1/query?query={}", url_encode(&q)));
            queries += 1;
            if v["data"]["result"]
                .as_array()
                .is_some_and(|r| !r.is_empty())
            {
                with_data.push(title.to_string());
            }
        }
    }
    with_data.dedup();
    println!(
        "dashboard: {queries} queries valid, {} panels with data",
        with_data.len()
    );
    for core in [
        "IOPS by kind",
        "Throughput",
        "Latency p50 / p99",
        "Degraded and rebuilding PGs",
        "Lease held and etcd reachable",
        "Fragment calls by node (gateway side)",
        "Node requests by op",
        "io_uring submissions and enters",
        "Store space",
    ] {
        assert!(
            with_data.iter().any(|t| t == core),
            "panel {core:?} shows no data"
        );
    }
    assert!(demo.stop());
}
