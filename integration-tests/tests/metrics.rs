//! `/metrics` of the gateway and the storage nodes, scraped over HTTP from a running
//! `tessera demo --backend ec` (whose demo.json names each process's metrics address): the
//! expected series exist, and they move when an initiator writes and reads.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use tessera_integration_tests::images::{compare, convert, random_file};
use tessera_integration_tests::{require_tool, Demo};

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
    let procs = demo.json["processes"]
        .as_array()
        .expect("processes")
        .clone();
    let addr_of = |role: &str| -> Vec<String> {
        procs
            .iter()
            .filter(|p| p["role"] == role)
            .map(|p| {
                p["metrics"]
                    .as_str()
                    .expect("processes[].metrics")
                    .to_string()
            })
            .collect()
    };
    let gw = addr_of("gateway").remove(0);
    let nodes = addr_of("node");
    assert_eq!(nodes.len(), 6);
    assert_eq!(
        addr_of("etcd").len(),
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
    ] {
        assert!(has(&before, name), "gateway lacks {name}: {before:?}");
    }
    assert_eq!(sum(&before, "tessera_cluster_lease_held", &[]), 1.0);
    assert!(sum(&before, "tessera_volume_epoch", &["volume=\"demo\""]) >= 1.0);
    for name in ["tessera_node_store_bytes", "tessera_node_events_total"] {
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
    let node_after = scrape(&nodes[0]);
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
    assert!(demo.stop());
}
