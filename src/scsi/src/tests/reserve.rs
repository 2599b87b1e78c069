//! SPC-2 reservations and persistent reservations across several I_T nexuses, unit
//! attentions they raise, and persistence through a `FilePrStore`.

use std::io;
use std::sync::Arc;

use tessera_proto::scsi::Sense;

use super::*;
use crate::{FilePrStore, LuConfig, PrStore};

const CONFLICT: u8 = 0x18;

async fn reserve6(lu: &LogicalUnit, n: &Nexus) -> ScsiResult {
    run(lu, n, &[0x16, 0, 0, 0, 0, 0], &[]).await
}

async fn release6(lu: &LogicalUnit, n: &Nexus) -> ScsiResult {
    run(lu, n, &[0x17, 0, 0, 0, 0, 0], &[]).await
}

#[tokio::test(flavor = "current_thread")]
async fn reserve6_excludes_other_initiators() {
    let (lu, a, b) = setup_fresh_pair().await;
    assert_good(&reserve6(&lu, &a).await);
    assert_good(&reserve6(&lu, &a).await);
    assert_eq!(reserve6(&lu, &b).await.status, CONFLICT);
    // RELEASE from b is a no-op; INQUIRY and REQUEST SENSE are allowed; others conflict.
    assert_good(&release6(&lu, &b).await);
    assert_good(&run(&lu, &b, &[0x12, 0, 0, 0, 36, 0], &[]).await);
    assert_good(&run(&lu, &b, &[0x03, 0, 0, 0, 18, 0], &[]).await);
    assert_eq!(
        run(&lu, &b, &[0x1A, 0, 0x3F, 0, 255, 0], &[]).await.status,
        CONFLICT
    );
    assert_eq!(read0(&lu, &b).await.status, CONFLICT);
    assert_eq!(run(&lu, &b, &[0; 6], &[]).await.status, CONFLICT);
    assert_good(&run(&lu, &a, &[0x1A, 0, 0x3F, 0, 255, 0], &[]).await);
    assert_good(&run(&lu, &a, &rw10(WRITE10, 0, 1, 0), &blocks(1, 1)).await);
    assert_good(&release6(&lu, &a).await);
    assert_good(&reserve6(&lu, &b).await);
    assert_good(&read0(&lu, &b).await);
    assert_good(&run(&lu, &b, &[0x57, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await);
    assert_good(&read0(&lu, &a).await);
}

#[tokio::test(flavor = "current_thread")]
async fn reserve6_is_dropped_by_nexus_loss_and_resets() {
    let (lu, a, b) = setup_fresh_pair().await;
    assert_good(&reserve6(&lu, &a).await);
    lu.nexus_gone(&a);
    assert_good(&reserve6(&lu, &b).await);
    lu.reset(Sense::BUS_DEVICE_RESET_FUNCTION_OCCURRED);
    let c = fresh_nexus(&lu, "c", 3).await;
    assert_good(&reserve6(&lu, &c).await);
    // Third-party reservations are not supported.
    let r = run(&lu, &c, &[0x56, 0x10, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await;
    assert_check(&r, 0x5, 0x24, 0);
}

fn prout(sa: u8, kind: u8, key: u64, sa_key: u64, flags: u8) -> (Vec<u8>, Vec<u8>) {
    let mut d = vec![0u8; 24];
    d[0..8].copy_from_slice(&key.to_be_bytes());
    d[8..16].copy_from_slice(&sa_key.to_be_bytes());
    d[20] = flags;
    (vec![0x5F, sa, kind, 0, 0, 0, 0, 0, 24, 0], d)
}

async fn pr_out(
    lu: &LogicalUnit,
    n: &Nexus,
    sa: u8,
    kind: u8,
    key: u64,
    sa_key: u64,
) -> ScsiResult {
    let (c, d) = prout(sa, kind, key, sa_key, 0);
    run(lu, n, &c, &d).await
}

/// REGISTER AND IGNORE EXISTING KEY `key` for `n`, which must succeed.
async fn register(lu: &LogicalUnit, n: &Nexus, key: u64) {
    assert_good(&pr_out(lu, n, 6, 0, 0, key).await);
}

/// [`setup`] with fresh nexuses `a` and `b` registered with keys 1 and 2.
async fn registered_pair() -> (Arc<LogicalUnit>, Nexus, Nexus) {
    let (lu, a, b) = setup_fresh_pair().await;
    register(&lu, &a, 1).await;
    register(&lu, &b, 2).await;
    (lu, a, b)
}

async fn pr_in(lu: &LogicalUnit, n: &Nexus, sa: u8, alloc: u16) -> ScsiResult {
    let a = alloc.to_be_bytes();
    run(lu, n, &[0x5E, sa, 0, 0, 0, 0, 0, a[0], a[1], 0], &[]).await
}

fn keys(r: &ScsiResult) -> Vec<u64> {
    r.data_in[8..]
        .chunks(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
        .collect()
}

#[tokio::test(flavor = "current_thread")]
async fn register_read_keys_and_truncation() {
    let (lu, a) = setup_fresh().await;
    let r = pr_out(&lu, &a, 6, 0, 0, 0xABCD).await;
    assert_good(&r);
    assert_eq!(r.transfer_len, 24);
    let r = pr_in(&lu, &a, 0, 16384).await;
    assert_good(&r);
    assert_eq!(keys(&r), vec![0xABCD]);
    let r = pr_in(&lu, &a, 0, 8).await;
    assert_eq!(r.data_in.len(), 8);
    assert_eq!(
        &r.data_in[4..8],
        &8u32.to_be_bytes(),
        "additional length not truncated"
    );
    // Re-registering with a wrong key conflicts; unregister.
    assert_eq!(pr_out(&lu, &a, 0, 0, 0, 0xABCE).await.status, CONFLICT);
    assert_good(&pr_out(&lu, &a, 0, 0, 0xABCD, 0).await);
    assert!(keys(&pr_in(&lu, &a, 0, 16384).await).is_empty());
    // READ FULL STATUS and REPORT CAPABILITIES work; service actions past 3 do not.
    assert_good(&pr_in(&lu, &a, 2, 16384).await);
    assert_good(&pr_in(&lu, &a, 3, 16384).await);
    for sa in 4..0x20u8 {
        assert_check(&pr_in(&lu, &a, sa, 16384).await, 0x5, 0x24, 0);
    }
}

#[tokio::test(flavor = "current_thread")]
async fn parameter_list_length_must_be_24() {
    let (lu, a) = setup_fresh().await;
    let (mut c, d) = prout(6, 0, 0, 1, 0);
    c[8] = 20;
    assert_check(&run(&lu, &a, &c, &d[..20]).await, 0x5, 0x1A, 0);
    c[8] = 0;
    assert_check(&run(&lu, &a, &c, &[]).await, 0x5, 0x1A, 0);
}

async fn access(lu: &LogicalUnit, n: &Nexus) -> (bool, bool) {
    let r = run(lu, n, &rw10(READ10, 1, 1, 0), &[]).await;
    let w = run(lu, n, &rw10(WRITE10, 1, 1, 0), &blocks(1, 0)).await;
    for x in [&r, &w] {
        assert!(x.status == 0 || x.status == CONFLICT, "{x:?}");
    }
    (r.status == 0, w.status == 0)
}

#[tokio::test(flavor = "current_thread")]
async fn reservation_types_gate_reads_and_writes() {
    // (type, registered reads, writes, unregistered reads, writes)
    let table = [
        (3u8, false, false, false, false),
        (1, true, false, true, false),
        (6, true, true, false, false),
        (5, true, true, true, false),
        (8, true, true, false, false),
        (7, true, true, true, false),
    ];
    for (kind, rr, rw, ur, uw) in table {
        let (lu, a, b) = setup_fresh_pair().await;
        register(&lu, &a, 0xA).await;
        register(&lu, &b, 0xB).await;
        assert_good(&pr_out(&lu, &a, 1, kind, 0xA, 0).await);
        let r = pr_in(&lu, &a, 1, 16384).await;
        let key = u64::from_be_bytes(r.data_in[8..16].try_into().unwrap());
        assert_eq!(key, if kind >= 7 { 0 } else { 0xA });
        assert_eq!(r.data_in[21], kind);
        assert_eq!(access(&lu, &a).await, (true, true), "holder, type {kind}");
        assert_eq!(access(&lu, &b).await, (rr, rw), "registered, type {kind}");
        assert_good(&pr_out(&lu, &b, 0, 0, 0xB, 0).await);
        assert_eq!(access(&lu, &b).await, (ur, uw), "unregistered, type {kind}");
        // PR IN/OUT and INQUIRY never conflict; RESERVE(6) does while registrations exist.
        assert_good(&pr_in(&lu, &b, 0, 16384).await);
        assert_good(&run(&lu, &b, &[0x12, 0, 0, 0, 36, 0], &[]).await);
        assert_eq!(reserve6(&lu, &b).await.status, CONFLICT);
        assert_good(&pr_out(&lu, &a, 2, kind, 0xA, 0).await);
        assert_good(&pr_out(&lu, &a, 0, 0, 0xA, 0).await);
        assert_eq!(access(&lu, &b).await, (true, true));
    }
}

#[tokio::test(flavor = "current_thread")]
async fn holder_unregistering_raises_no_unit_attention_for_itself() {
    for kind in [3u8, 1, 6, 5] {
        let (lu, a, b) = registered_pair().await;
        assert_good(&pr_out(&lu, &a, 1, kind, 1, 0).await);
        assert_good(&pr_out(&lu, &a, 0, 0, 1, 0).await);
        // a: not reserved, no UA.
        let r = pr_in(&lu, &a, 1, 16384).await;
        assert_good(&r);
        assert_eq!(&r.data_in[4..8], &[0; 4]);
        // b: RESERVATIONS RELEASED only for registrants-only types.
        let t = run(&lu, &b, &[0; 6], &[]).await;
        if kind == 5 || kind == 6 {
            assert_check(&t, 0x6, 0x2A, 0x04);
        } else {
            assert_good(&t);
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn preempt_removes_registration_and_tells_the_victim() {
    let (lu, a, b) = registered_pair().await;
    let gen = u32::from_be_bytes(
        pr_in(&lu, &a, 0, 100).await.data_in[..4]
            .try_into()
            .unwrap(),
    );
    assert_good(&pr_out(&lu, &b, 4, 3, 2, 1).await);
    assert_check(&run(&lu, &a, &[0; 6], &[]).await, 0x6, 0x2A, 0x05);
    assert_good(&run(&lu, &b, &[0; 6], &[]).await);
    let r = pr_in(&lu, &a, 0, 100).await;
    assert_eq!(keys(&r), vec![2]);
    assert_eq!(
        u32::from_be_bytes(r.data_in[..4].try_into().unwrap()),
        gen + 1
    );
}

#[tokio::test(flavor = "current_thread")]
async fn clear_wipes_everything_and_tells_the_others() {
    let (lu, a, b) = registered_pair().await;
    assert_good(&pr_out(&lu, &a, 1, 3, 1, 0).await);
    assert_eq!(read0(&lu, &b).await.status, CONFLICT);
    assert_good(&pr_out(&lu, &a, 3, 0, 1, 0).await);
    assert_check(&read0(&lu, &b).await, 0x6, 0x2A, 0x03);
    assert_good(&read0(&lu, &b).await);
    assert!(lu.pr_state().is_empty());
}

/// A registrant whose session is down when it is preempted hears about it on return.
#[tokio::test(flavor = "current_thread")]
async fn unit_attention_waits_for_a_disconnected_registrant() {
    let (lu, a, b) = registered_pair().await;
    lu.nexus_gone(&a);
    assert_good(&pr_out(&lu, &b, 4, 1, 2, 1).await);
    let a_again = nexus("a", 1);
    assert_check(&run(&lu, &a_again, &[0; 6], &[]).await, 0x6, 0x2A, 0x05);
}

#[derive(Default)]
struct FailingStore;

impl PrStore for FailingStore {
    fn load(&self) -> io::Result<Option<Vec<u8>>> {
        Ok(None)
    }
    fn save(&self, _: &[u8]) -> io::Result<()> {
        Err(io::Error::other("disk gone"))
    }
}

#[tokio::test(flavor = "current_thread")]
async fn failed_persistence_fails_the_command_and_changes_nothing() {
    let lu = LogicalUnit::new(
        LuConfig::default(),
        Arc::new(TestDevice::new(1 << 20)),
        Some(Box::new(FailingStore)),
    )
    .unwrap();
    let a = fresh_nexus(&lu, "a", 1).await;
    assert_check(&pr_out(&lu, &a, 6, 0, 0, 1).await, 0x4, 0x44, 0);
    assert!(lu.pr_state().is_empty());
}

#[tokio::test(flavor = "current_thread")]
async fn registrations_survive_a_restart_through_the_file_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lun0.pr");
    let dev: Arc<TestDevice> = Arc::new(TestDevice::new(1 << 20));
    let a = nexus("a", 1);
    let b = nexus("b", 2);
    {
        let lu = LogicalUnit::new(
            LuConfig::default(),
            dev.clone(),
            Some(Box::new(FilePrStore::new(&path))),
        )
        .unwrap();
        fresh(&lu, &a).await;
        fresh(&lu, &b).await;
        register(&lu, &a, 0x1111).await;
        register(&lu, &b, 0x2222).await;
        // APTPL is that of the last registration.
        let (c, d) = prout(6, 0, 0, 0x1111, 0x01);
        assert_good(&run(&lu, &a, &c, &d).await);
        assert_good(&pr_out(&lu, &a, 1, 5, 0x1111, 0).await);
    }
    let lu = LogicalUnit::new(
        LuConfig::default(),
        dev,
        Some(Box::new(FilePrStore::new(&path))),
    )
    .unwrap();
    // The same initiator port in a new session.
    let a = nexus("a", 1);
    let c = nexus("c", 6);
    fresh(&lu, &a).await;
    fresh(&lu, &c).await;
    let r = pr_in(&lu, &a, 0, 100).await;
    assert_eq!(keys(&r), vec![0x1111, 0x2222]);
    let r = pr_in(&lu, &a, 1, 100).await;
    assert_eq!(r.data_in[21], 5);
    let caps = pr_in(&lu, &a, 2, 100).await;
    assert_eq!(caps.data_in[3] & 0x01, 1, "PTPL_A reported as given");
    // The reservation is enforced after the restart: c is not registered.
    assert_eq!(
        run(&lu, &c, &rw10(WRITE10, 0, 1, 0), &blocks(1, 0))
            .await
            .status,
        CONFLICT
    );
    assert_good(&write0(&lu, &a).await);
    // A corrupt file refuses to load rather than silently dropping reservations.
    std::fs::write(&path, b"garbage").unwrap();
    let err = LogicalUnit::new(
        LuConfig::default(),
        Arc::new(TestDevice::new(1 << 20)),
        Some(Box::new(FilePrStore::new(&path))),
    );
    assert_eq!(err.unwrap_err().kind(), io::ErrorKind::InvalidData);
}
