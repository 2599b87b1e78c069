//! Unit attention lifecycle and the admission fast path.

use tessera_proto::scsi::Sense;

use super::*;

#[tokio::test(flavor = "current_thread")]
async fn new_nexus_sees_power_on_once() {
    let (lu, _) = setup();
    let n = nexus("a", 1);
    let r = read0(&lu, &n).await;
    assert_check(&r, 0x6, 0x29, 0x00);
    assert!(r.data_in.is_empty());
    assert_good(&read0(&lu, &n).await);
    assert_good(&run(&lu, &n, &[0; 6], &[]).await);
}

#[tokio::test(flavor = "current_thread")]
async fn inquiry_report_luns_and_request_sense_are_not_blocked() {
    let (lu, _) = setup();
    let n = nexus("a", 1);
    assert_good(&run(&lu, &n, &[0x12, 0, 0, 0, 36, 0], &[]).await);
    assert_good(&run(&lu, &n, &[0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]).await);
    // Neither consumed the condition.
    assert_check(&run(&lu, &n, &[0; 6], &[]).await, 0x6, 0x29, 0x00);
}

#[tokio::test(flavor = "current_thread")]
async fn logical_unit_reset_reaches_every_nexus_including_the_issuer() {
    let (lu, a, b) = setup_fresh_pair().await;
    // Warm the fast-path cache on both.
    assert_good(&read0(&lu, &a).await);
    assert_good(&read0(&lu, &b).await);
    lu.reset(Sense::BUS_DEVICE_RESET_FUNCTION_OCCURRED);
    assert_check(&read0(&lu, &a).await, 0x6, 0x29, 0x03);
    assert_check(&write0(&lu, &b).await, 0x6, 0x29, 0x03);
    assert_good(&read0(&lu, &a).await);
    assert_good(&read0(&lu, &b).await);
}

#[tokio::test(flavor = "current_thread")]
async fn capacity_change_is_announced() {
    let (lu, n) = setup_fresh().await;
    lu.capacity_changed();
    assert_check(
        &run(&lu, &n, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await,
        0x6,
        0x2A,
        0x09,
    );
    assert_good(&run(&lu, &n, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await);
}

#[tokio::test(flavor = "current_thread")]
async fn nexus_gone_forgets_its_queue() {
    let (lu, n) = setup_fresh().await;
    lu.capacity_changed();
    lu.nexus_gone(&n);
    // Logging in again is a new nexus: it sees power-on, not the old condition.
    let again = nexus("a", 1);
    assert_ua_once(&lu, &again, 0x29, 0x00).await;
}

#[tokio::test(flavor = "current_thread")]
async fn unit_attentions_are_reported_in_order_without_duplicates() {
    let (lu, n) = setup_fresh().await;
    lu.capacity_changed();
    lu.capacity_changed();
    lu.unit_attention_all(Sense::REPORTED_LUNS_DATA_HAS_CHANGED);
    assert_check(&run(&lu, &n, &[0; 6], &[]).await, 0x6, 0x2A, 0x09);
    assert_ua_once(&lu, &n, 0x3F, 0x0E).await;
}

#[tokio::test(flavor = "current_thread")]
async fn cached_admission_sees_a_new_reservation() {
    let (lu, a, b) = setup_fresh_pair().await;
    // b's reads are admitted from the per-core cache...
    for _ in 0..3 {
        assert_good(&read0(&lu, &b).await);
    }
    // ...until a takes an SPC-2 reservation: the epoch moves and b conflicts at once.
    assert_good(&run(&lu, &a, &[0x16, 0, 0, 0, 0, 0], &[]).await);
    assert_eq!(read0(&lu, &b).await.status, 0x18);
    assert_good(&run(&lu, &a, &[0x17, 0, 0, 0, 0, 0], &[]).await);
    assert_good(&read0(&lu, &b).await);
}
