//! Task management and lost connections during overlapping writes, against an erasure-coded
//! volume (`tessera demo --backend ec`, 4+2 over six node processes).
//!
//! Two sessions of one initiator pipeline writes into the same stripes (each write its own
//! blocks, so what every block may hold is known), and every round one of them sends a real
//! ABORT TASK, a LOGICAL UNIT RESET, or drops its connection and logs in again (session
//! reinstatement). After each round: every acknowledged write reads back new; every aborted,
//! failed or unanswered write reads back, stripe by stripe, wholly old or wholly new; nothing
//! else changed; and a second read a moment later is identical (a task management answer, and a
//! reinstated login, mean the aborted commands can have no further effect).

use std::time::Duration;

use tessera_integration_tests::initiator::{Answer, Session};
use tessera_integration_tests::{ec_4_2, seed, Demo, Rng};
use tessera_proto::iscsi::pdu::tmf;

const BLOCK: usize = 4096;
/// 16 stripes of 4 × 16 KiB.
const STRIPE_BLOCKS: usize = 16;
const REGION: usize = 16 * STRIPE_BLOCKS;
const INITIATOR: &str = "iqn.2024-01.test:aborts";

/// The contents of block `b` as written by write `id` (0: never written: zeroes).
fn block(id: u64, b: usize) -> Vec<u8> {
    if id == 0 {
        return vec![0; BLOCK];
    }
    let mut r = Rng::new(id.wrapping_mul(0x9e37_79b9) ^ b as u64);
    let mut v: Vec<u8> = (0..BLOCK / 8)
        .flat_map(|_| r.next_u64().to_le_bytes())
        .collect();
    v[..8].copy_from_slice(&id.to_be_bytes());
    v[8..16].copy_from_slice(&(b as u64).to_be_bytes());
    v
}

fn write16(first: usize, n: usize) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x8a;
    c[2..10].copy_from_slice(&(first as u64).to_be_bytes());
    c[10..14].copy_from_slice(&(n as u32).to_be_bytes());
    c
}

/// SCSI commands the gateway is executing now (its `tessera_scsi_commands_in_flight`).
fn executing(demo: &Demo) -> i64 {
    demo.gateway_metrics()
        .lines()
        .filter(|l| l.starts_with("tessera_scsi_commands_in_flight{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<i64>().ok())
        .sum()
}

fn read_region(s: &mut Session) -> Vec<Vec<u8>> {
    let mut c = [0u8; 16];
    c[0] = 0x88;
    c[10..14].copy_from_slice(&(REGION as u32).to_be_bytes());
    for _ in 0..8 {
        let o = s
            .command(0, &c, &[], (REGION * BLOCK) as u32)
            .expect("read");
        if o.status == 0 {
            assert_eq!(o.data.len(), REGION * BLOCK);
            return o.data.chunks(BLOCK).map(<[u8]>::to_vec).collect();
        }
        // A unit attention after a reset: the next try gets the data.
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the region could not be read");
}

#[derive(Debug)]
struct W {
    id: u64,
    first: usize,
    n: usize,
    /// Session 0 or 1.
    on: usize,
    itt: u32,
    cmd_sn: u32,
    /// SCSI status, once answered.
    status: Option<u8>,
}

#[derive(Debug, Default)]
struct Counts {
    acked: u64,
    failed: u64,
    aborted: u64,
    lost_with_connection: u64,
}

#[test]
fn aborts_resets_and_dropped_connections_during_overlapping_writes_lose_nothing() {
    let seed = seed("aborts");
    let mut rng = Rng::new(seed);
    let demo = Demo::start(&ec_4_2(&["--size", "16MiB", "--block-size", "4096"]));
    let isids = [[0x80, 0, 0, 0, 0xab, 1], [0x80, 0, 0, 0, 0xab, 2]];
    let login = |i: usize| Session::open(demo.portal, INITIATOR, &demo.iqn, isids[i]);
    let mut sessions = vec![login(0), login(1)];
    let mut state = read_region(&mut sessions[0]);
    let mut next_id = 1u64;
    let mut counts = Counts::default();
    const ROUNDS: usize = 15;
    for round in 0..ROUNDS {
        let fault = round % 3;
        // Disjoint runs of 1..=8 blocks over the region, each on one of the sessions.
        let mut writes: Vec<W> = Vec::new();
        let mut b = rng.below(3) as usize;
        while b < REGION {
            let n = (1 + rng.below(8) as usize).min(REGION - b);
            writes.push(W {
                id: next_id,
                first: b,
                n,
                on: rng.below(2) as usize,
                itt: 0,
                cmd_sn: 0,
                status: None,
            });
            next_id += 1;
            b += n + rng.below(3) as usize;
        }
        for w in &mut writes {
            let data: Vec<u8> = (w.first..w.first + w.n)
                .flat_map(|b| block(w.id, b))
                .collect();
            let (itt, sn) = sessions[w.on]
                .send_command(0, &write16(w.first, w.n), &data, 0)
                .expect("send write");
            (w.itt, w.cmd_sn) = (itt, sn);
        }
        // The fault, on session 0 (ABORT TASK of its last write, a LUN reset) or 1 (its
        // connection dropped).
        let mut aborted: Vec<u64> = Vec::new();
        match fault {
            0 | 1 => {
                let target = writes
                    .iter()
                    .rfind(|w| w.on == 0)
                    .map(|w| (w.id, w.itt, w.cmd_sn));
                let (function, rtt, ref_sn) = match (fault, target) {
                    (0, Some((_, itt, sn))) => (tmf::ABORT_TASK, itt, sn),
                    _ => (tmf::LOGICAL_UNIT_RESET, 0, 0),
                };
                let tmf_itt = sessions[0].send_tmf(function, 0, rtt, ref_sn).unwrap();
                // Answers until the function's; what is unanswered then was aborted (LUN
                // reset), or is the one task ABORT TASK named if it says "complete".
                loop {
                    match sessions[0].next_answer().expect("answers on session 0") {
                        Answer::Command(itt, o) => {
                            if let Some(w) = writes.iter_mut().find(|w| w.on == 0 && w.itt == itt) {
                                w.status = Some(o.status);
                            }
                        }
                        Answer::TaskMgmt(i, code) if i == tmf_itt => {
                            if function == tmf::LOGICAL_UNIT_RESET {
                                assert_eq!(code, 0, "round {round}: LUN reset answered {code}");
                                aborted.extend(
                                    writes
                                        .iter()
                                        .filter(|w| w.on == 0 && w.status.is_none())
                                        .map(|w| w.id),
                                );
                            } else {
                                assert!(code <= 1, "round {round}: ABORT TASK answered {code}");
                                if code == 0 {
                                    aborted.extend(target.map(|t| t.0));
                                }
                            }
                            break;
                        }
                        Answer::TaskMgmt(..) | Answer::Nop(_) => {}
                    }
                }
                // Everything else of both sessions is answered.
                for (on, session) in sessions.iter_mut().enumerate() {
                    while writes
                        .iter()
                        .any(|w| w.on == on && w.status.is_none() && !aborted.contains(&w.id))
                    {
                        if let Answer::Command(itt, o) = session.next_answer().expect("answers") {
                            if let Some(w) = writes.iter_mut().find(|w| w.on == on && w.itt == itt)
                            {
                                w.status = Some(o.status);
                            }
                        }
                    }
                }
            }
            _ => {
                // Session 0's answers all come; session 1's connection is cut, and its
                // initiator logs in again with the same ISID (reinstating the session).
                while writes.iter().any(|w| w.on == 0 && w.status.is_none()) {
                    if let Answer::Command(itt, o) = sessions[0].next_answer().expect("answers") {
                        if let Some(w) = writes.iter_mut().find(|w| w.on == 0 && w.itt == itt) {
                            w.status = Some(o.status);
                        }
                    }
                }
                sessions.remove(1).drop_connection();
                sessions.push(login(1));
                aborted.extend(writes.iter().filter(|w| w.on == 1).map(|w| w.id));
            }
        }
        // Every command is answered, or aborted and answered for by its task management
        // function (or its session replaced): none may still be executing.
        let left = executing(&demo);
        assert_eq!(
            left, 0,
            "round {round} (seed {seed}): {left} commands still executing after every answer"
        );
        // What each block may hold now.
        let now = read_region(&mut sessions[0]);
        let mut covered = vec![false; REGION];
        for w in &writes {
            for c in covered.iter_mut().skip(w.first).take(w.n) {
                *c = true;
            }
            let acked = w.status == Some(0) && !aborted.contains(&w.id);
            if acked {
                counts.acked += 1;
            } else if aborted.contains(&w.id) {
                if fault == 2 {
                    counts.lost_with_connection += 1;
                } else {
                    counts.aborted += 1;
                }
            } else {
                counts.failed += 1;
            }
            // Per stripe piece: wholly old or wholly new; acknowledged: new.
            let mut b = w.first;
            while b < w.first + w.n {
                let end = ((b / STRIPE_BLOCKS + 1) * STRIPE_BLOCKS).min(w.first + w.n);
                let new = (b..end).all(|x| now[x] == block(w.id, x));
                let old = (b..end).all(|x| now[x] == state[x]);
                assert!(
                    new || old,
                    "round {round} (seed {seed}): write {} (status {:?}, aborted {}) left blocks {b}..{end} neither old nor new",
                    w.id,
                    w.status,
                    aborted.contains(&w.id)
                );
                if acked {
                    assert!(
                        new,
                        "round {round} (seed {seed}): acknowledged write {} lost at blocks {b}..{end}",
                        w.id
                    );
                }
                b = end;
            }
        }
        for (x, c) in covered.iter().enumerate() {
            if !*c {
                assert_eq!(
                    now[x], state[x],
                    "round {round}: block {x} written by nobody changed"
                );
            }
        }
        // No aborted command has any effect later.
        std::thread::sleep(Duration::from_millis(300));
        let later = read_region(&mut sessions[0]);
        assert!(
            later == now,
            "round {round} (seed {seed}): the region changed after the task management answer"
        );
        state = now;
    }
    println!(
        "aborts: {ROUNDS} rounds: {} writes acknowledged, {} failed, {} aborted by ABORT TASK or LUN reset, {} lost with a connection",
        counts.acked, counts.failed, counts.aborted, counts.lost_with_connection
    );
    assert!(counts.acked > 0, "no write was acknowledged");
    assert!(
        counts.aborted > 0,
        "no write was still running when its task management function came"
    );
    assert!(demo.stop());
}

/// Task management runs beside the connection's other work: while an ABORT TASK waits for a
/// write that cannot finish yet (three of six nodes stopped: no quorum until they are marked
/// down), the same connection answers a NOP-Out at once, and the abort is answered only after
/// the write has ended.
#[test]
fn a_waiting_task_management_function_blocks_nothing_else() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let demo = Demo::start(&["--backend", "ec", "--ec", "4+2", "--size", "16MiB"]);
    let mut s = Session::open(demo.portal, INITIATOR, &demo.iqn, [0x80, 0, 0, 0, 0xac, 1]);
    // A first write, so that the volume knows how fast its nodes answer.
    let o = s
        .command(0, &write16(0, 1), &block(1, 0), 0)
        .expect("write");
    assert_eq!(o.status, 0);
    let nodes = demo.nodes();
    let stopped: Vec<Pid> = nodes[..3]
        .iter()
        .map(|n| Pid::from_raw(n.pid as i32))
        .collect();
    for p in &stopped {
        kill(*p, Signal::SIGSTOP).unwrap();
    }
    let (itt, sn) = s
        .send_command(0, &write16(1, 1), &block(2, 1), 0)
        .expect("send write");
    std::thread::sleep(Duration::from_millis(100));
    let tmf = s.send_tmf(tmf::ABORT_TASK, 0, itt, sn).unwrap();
    let nop = s.send_nop().unwrap();
    let mut order = Vec::new();
    while order.len() < 2 {
        match s.next_answer().expect("answers") {
            Answer::Nop(i) if i == nop => order.push("nop"),
            Answer::TaskMgmt(i, code) if i == tmf => {
                assert!(code <= 1, "ABORT TASK answered {code}");
                order.push("abort");
            }
            Answer::Command(i, o) => panic!("the aborted write {i} was answered: {o:?}"),
            _ => {}
        }
    }
    for p in &stopped {
        kill(*p, Signal::SIGCONT).unwrap();
    }
    assert_eq!(
        order,
        ["nop", "abort"],
        "the NOP-In came first: the connection was not waiting on the abort"
    );
    assert_eq!(
        executing(&demo),
        0,
        "nothing executing after the abort's answer"
    );
    assert!(demo.stop());
}
