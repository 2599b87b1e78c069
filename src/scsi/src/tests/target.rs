//! Target routing: REPORT LUNS, absent LUNs, LUN decoding, task management side effects.

use std::rc::Rc;
use std::sync::Arc;

use super::*;
use crate::{Target, TmfFunction, TmfResponse};

fn lun(n: u64) -> [u8; 8] {
    tessera_proto::scsi::luns::encode(n)
}

fn report_luns(select: u8, alloc: u32) -> Vec<u8> {
    let mut c = vec![0u8; 12];
    c[0] = 0xA0;
    c[2] = select;
    c[6..10].copy_from_slice(&alloc.to_be_bytes());
    c
}

async fn trun(t: &Target, n: &Nexus, l: u64, cdb: &[u8]) -> ScsiResult {
    t.execute(n, lun(l), &command(cdb, &[], 4096)).await
}

fn target_with(luns: &[u64]) -> Target {
    let t = Target::new("iqn.2024-01.io.tessera:vol");
    for &l in luns {
        t.add_lun(l, setup().0);
    }
    t
}

#[tokio::test(flavor = "current_thread")]
async fn report_luns_lists_every_lun() {
    let t = target_with(&[0, 3, 300]);
    let n = nexus("a", 1);
    // Works on any LUN, including absent ones, without being blocked by unit attentions.
    let r = trun(&t, &n, 9, &report_luns(0, 4096)).await;
    assert_good(&r);
    assert_eq!(&r.data_in[..4], &24u32.to_be_bytes());
    assert_eq!(&r.data_in[8..10], &[0, 0]);
    assert_eq!(&r.data_in[16..18], &[0, 3]);
    assert_eq!(&r.data_in[24..26], &[0x41, 0x2C]);
    let r = trun(&t, &n, 0, &report_luns(2, 4096)).await;
    assert_eq!(r.data_in.len(), 32);
    let r = trun(&t, &n, 0, &report_luns(1, 4096)).await;
    assert_eq!(&r.data_in[..], &[0; 8]);
    assert_check(&trun(&t, &n, 0, &report_luns(0, 15)).await, 0x5, 0x24, 0);
    assert_check(
        &trun(&t, &n, 0, &report_luns(0x10, 4096)).await,
        0x5,
        0x24,
        0,
    );
    let r = trun(&t, &n, 0, &report_luns(0, 16)).await;
    assert_eq!(r.data_in.len(), 16);
    assert_eq!(r.transfer_len, 16);
}

#[tokio::test(flavor = "current_thread")]
async fn absent_luns() {
    let t = target_with(&[0]);
    let n = nexus("a", 1);
    let r = trun(&t, &n, 5, &[0x12, 0, 0, 0, 96, 0]).await;
    assert_good(&r);
    assert_eq!(r.data_in[0], 0x7F);
    let r = trun(&t, &n, 5, &[0x12, 1, 0, 0, 96, 0]).await;
    assert_good(&r);
    assert_eq!(r.data_in[0], 0x7F);
    assert_check(&trun(&t, &n, 5, &[0; 6]).await, 0x5, 0x25, 0);
    assert_check(&trun(&t, &n, 5, &rw10(READ10, 0, 1, 0)).await, 0x5, 0x25, 0);
    let r = trun(&t, &n, 5, &[0x03, 0, 0, 0, 18, 0]).await;
    assert_good(&r);
    assert_eq!((r.data_in[2], r.data_in[12]), (0x5, 0x25));
    // An undecodable LUN field is absent too.
    let r = t
        .execute(&n, [0xC0, 0, 0, 0, 0, 0, 0, 0], &command(&[0; 6], &[], 0))
        .await;
    assert_check(&r, 0x5, 0x25, 0);
}

#[test]
fn lun_decoding() {
    assert_eq!(Target::decode_lun([0, 7, 0, 0, 0, 0, 0, 0]), 7);
    assert_eq!(Target::decode_lun([0x40, 0xFF, 0, 0, 0, 0, 0, 0]), 255);
    assert_eq!(Target::decode_lun([0x7F, 0xFF, 0, 0, 0, 0, 0, 0]), 16383);
    assert_eq!(Target::decode_lun([0x80, 1, 0, 0, 0, 0, 0, 0]), u64::MAX);
    assert_eq!(Target::decode_lun([0, 1, 0, 2, 0, 0, 0, 0]), u64::MAX);
}

#[tokio::test(flavor = "current_thread")]
async fn lun_inventory_changes_raise_and_report_luns_clears() {
    let t = target_with(&[0]);
    let n = nexus("a", 1);
    assert_good(&{
        fresh(&t.lun(0).unwrap(), &n).await;
        trun(&t, &n, 0, &[0; 6]).await
    });
    t.add_lun(1, setup().0);
    assert_eq!(t.luns(), vec![0, 1]);
    // REPORT LUNS clears the pending REPORTED LUNS DATA HAS CHANGED.
    assert_good(&trun(&t, &n, 0, &report_luns(0, 4096)).await);
    assert_good(&trun(&t, &n, 0, &[0; 6]).await);
    t.add_lun(2, setup().0);
    assert_check(&trun(&t, &n, 0, &[0; 6]).await, 0x6, 0x3F, 0x0E);
    assert!(t.remove_lun(2).is_some());
    assert!(t.remove_lun(2).is_none());
    assert_check(&trun(&t, &n, 2, &[0; 6]).await, 0x5, 0x25, 0);
}

#[tokio::test(flavor = "current_thread")]
async fn task_management_side_effects() {
    let t = target_with(&[0, 1]);
    let a = nexus("a", 1);
    let b = nexus("b", 2);
    for l in [0, 1] {
        fresh(&t.lun(l).unwrap(), &a).await;
        fresh(&t.lun(l).unwrap(), &b).await;
    }
    // RESERVE on LUN 0 by a; LUN RESET releases it and tells everyone on LUN 0 only.
    assert_good(&trun(&t, &a, 0, &[0x16, 0, 0, 0, 0, 0]).await);
    assert_eq!(
        t.task_mgmt(&a, lun(0), TmfFunction::LogicalUnitReset).await,
        TmfResponse::Complete
    );
    assert_check(&trun(&t, &a, 0, &[0; 6]).await, 0x6, 0x29, 0x03);
    assert_check(&trun(&t, &b, 0, &[0; 6]).await, 0x6, 0x29, 0x03);
    assert_good(&trun(&t, &b, 1, &[0; 6]).await);
    assert_good(&trun(&t, &b, 0, &[0x16, 0, 0, 0, 0, 0]).await);
    assert_eq!(
        t.task_mgmt(&a, lun(7), TmfFunction::LogicalUnitReset).await,
        TmfResponse::NoSuchLun
    );
    assert_eq!(
        t.task_mgmt(&a, lun(0), TmfFunction::AbortTask { tag: 3 })
            .await,
        TmfResponse::Complete
    );
    assert_eq!(
        t.task_mgmt(&a, lun(0), TmfFunction::ClearAca).await,
        TmfResponse::NotSupported
    );
    // A warm reset resets every LUN.
    assert_eq!(
        t.task_mgmt(&a, lun(0), TmfFunction::TargetWarmReset).await,
        TmfResponse::Complete
    );
    for l in [0, 1] {
        assert_check(&trun(&t, &a, l, &[0; 6]).await, 0x6, 0x29, 0x00);
    }
    assert_good(&trun(&t, &a, 0, &[0x16, 0, 0, 0, 0, 0]).await);
    // Logout through the target releases it.
    t.nexus_gone(&a);
    assert_check(&trun(&t, &b, 0, &[0; 6]).await, 0x6, 0x29, 0x00);
    assert_good(&trun(&t, &b, 0, &[0x16, 0, 0, 0, 0, 0]).await);
    let _ = Arc::strong_count(&t.lun(0).unwrap());
}

#[test]
fn shared_across_cores() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Target>();
    send_sync::<LogicalUnit>();
    send_sync::<crate::FilePrStore>();
}

/// A remote LUN that records what reached it.
#[derive(Default)]
struct Elsewhere {
    seen: Mutex<Vec<String>>,
}

impl crate::RemoteLun for Elsewhere {
    fn execute<'a>(
        &'a self,
        nexus: &'a Nexus,
        cmd: &'a ScsiCommand,
    ) -> LocalBoxFuture<'a, ScsiResult> {
        self.seen
            .lock()
            .unwrap()
            .push(format!("cmd {:02x} from {}", cmd.cdb[0], nexus.id));
        Box::pin(async move {
            ScsiResult {
                status: 0,
                sense: None,
                data_in: Bytes::from_static(b"remote"),
                transfer_len: 6,
            }
        })
    }

    fn task_mgmt<'a>(
        &'a self,
        _nexus: &'a Nexus,
        f: TmfFunction,
    ) -> LocalBoxFuture<'a, TmfResponse> {
        self.seen.lock().unwrap().push(format!("tmf {f:?}"));
        Box::pin(async { TmfResponse::Complete })
    }

    fn nexus_gone(&self, nexus: &Nexus) {
        self.seen.lock().unwrap().push(format!("gone {}", nexus.id));
    }
}

#[tokio::test(flavor = "current_thread")]
async fn remote_luns_take_every_command_tmf_and_nexus_loss() {
    let t = target_with(&[0]);
    let far = Arc::new(Elsewhere::default());
    t.add_remote_lun(5, far.clone());
    let n = nexus("a", 7);
    // REPORT LUNS is the target's own and lists the remote LUN.
    let r = trun(&t, &n, 0, &report_luns(0, 4096)).await;
    assert_eq!(&r.data_in[..4], &16u32.to_be_bytes());
    let r = trun(&t, &n, 5, &[0; 6]).await;
    assert_eq!(&r.data_in[..], b"remote");
    assert_eq!(
        t.task_mgmt(&n, lun(5), TmfFunction::LogicalUnitReset).await,
        TmfResponse::Complete
    );
    t.nexus_gone(&n);
    assert_eq!(
        *far.seen.lock().unwrap(),
        vec!["cmd 00 from 7", "tmf LogicalUnitReset", "gone 7"]
    );
    // A remote LUN is not a local one; swapping it for a local one keeps the LUN.
    assert!(t.lun(5).is_none());
    t.add_lun(5, setup().0);
    assert!(t.lun(5).is_some());
    assert_eq!(t.luns(), vec![0, 5]);
}

#[test]
fn a_removed_lun_keeps_its_executing_commands_until_they_finish() {
    let mut dev = TestDevice::new(1 << 20);
    dev.yields = true;
    let (lu, dev) = setup_with(LuConfig::default(), dev);
    let t = Target::new("iqn.2024-01.test:drain");
    t.add_lun(3, lu.clone());
    local(async move {
        let n = nexus("iqn.2024-01.test:i", 1);
        let data = blocks(8, 0x5a);
        let t = Rc::new(t);
        trun(&t, &n, 3, &[0; 6]).await; // the power-on unit attention
        let cmd = command(&rw10(WRITE10, 0, 8, 0), &data, data.len() as u32);
        let (t2, n2) = (t.clone(), n.clone());
        let w = tokio::task::spawn_local(async move { t2.execute(&n2, lun(3), &cmd).await });
        // The write has started (the device yields mid-way): counted.
        while lu.in_flight() == 0 {
            tokio::task::yield_now().await;
        }
        let removed = t.remove_lun(3).expect("a local LUN");
        assert!(Arc::ptr_eq(&removed, &lu));
        // New commands no longer reach it; the one executing does.
        let r = trun(&t, &n, 3, &rw10(READ10, 0, 8, 0)).await;
        assert_check(&r, 5, 0x25, 0);
        assert_eq!(lu.in_flight(), 1);
        assert_good(&w.await.unwrap());
        assert_eq!(lu.in_flight(), 0, "drained");
        assert_eq!(&read_blocks(&lu, &n, 0, 8).await[..], &data[..]);
        assert!(dev.writes.load(Ordering::SeqCst) > 0);
    });
}
