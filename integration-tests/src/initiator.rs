//! A small blocking iSCSI initiator over a real socket, built from `tessera-proto`'s own
//! encoders: enough to log in, run SCSI commands (with immediate data) one at a time or many
//! at once, send task management functions and read their answers, for tests that need
//! control libiscsi does not give (same ISID twice, a session kept open across abuse,
//! PERSISTENT RESERVE OUT with chosen parameters, ABORT TASK of a chosen write).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tessera_proto::iscsi::framer::{Framer, TxQueue};
use tessera_proto::iscsi::pdu::{
    stage, Bhs, LoginRequest, LoginResponse, NopOut, Pdu, Response, ScsiCommand, TaskMgmtRequest,
};
use tessera_proto::iscsi::text;

/// A 10-byte CDB with an LBA and a transfer length in blocks: READ(10) (`0x28`) or
/// WRITE(10) (`0x2a`).
pub fn cdb10(op: u8, lba: u64, blocks: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = op;
    c[2..6].copy_from_slice(&(lba as u32).to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

/// An initiator session on one connection.
pub struct Session {
    stream: TcpStream,
    rbuf: BytesMut,
    framer: Framer,
    cmd_sn: u32,
    exp_stat_sn: u32,
    itt: u32,
    /// Data-In received so far, per command.
    data_in: HashMap<u32, Vec<u8>>,
}

/// An answer from the target to a pipelined request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// A SCSI command finished.
    Command(u32, Outcome),
    /// A task management function was answered: (its ITT, the response code).
    TaskMgmt(u32, u8),
    /// A NOP-In answered a NOP-Out of ours (its ITT).
    Nop(u32),
}

/// The outcome of a SCSI command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// SCSI status.
    pub status: u8,
    /// Data-In.
    pub data: Vec<u8>,
    /// Sense data (without the 2-byte length).
    pub sense: Vec<u8>,
}

impl Session {
    /// Connect and log in to `target` as `initiator` with `isid`, no authentication.
    pub fn login(
        portal: SocketAddr,
        initiator: &str,
        target: &str,
        isid: [u8; 6],
    ) -> std::io::Result<Self> {
        let stream = TcpStream::connect(portal)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_nodelay(true)?;
        let mut s = Self {
            stream,
            rbuf: BytesMut::new(),
            framer: Framer::new(16 << 20),
            cmd_sn: 1,
            exp_stat_sn: 0,
            itt: 1,
            data_in: HashMap::new(),
        };
        let keys = text::encode(&[
            ("InitiatorName", initiator),
            ("TargetName", target),
            ("SessionType", "Normal"),
            ("HeaderDigest", "None"),
            ("DataDigest", "None"),
            ("MaxRecvDataSegmentLength", "262144"),
            ("ImmediateData", "Yes"),
            ("InitialR2T", "No"),
            ("FirstBurstLength", "65536"),
        ]);
        let req = LoginRequest {
            transit: true,
            csg: stage::OPERATIONAL,
            nsg: stage::FULL_FEATURE,
            isid,
            itt: 0,
            cmd_sn: s.cmd_sn,
            ..Default::default()
        };
        s.send(req.encode(), keys)?;
        let r = s.recv()?;
        let lr = LoginResponse::decode(&r.bhs);
        if (lr.status_class, lr.status_detail) != (0, 0) || !lr.transit {
            return Err(std::io::Error::other(format!(
                "login failed: {:02x}{:02x}",
                lr.status_class, lr.status_detail
            )));
        }
        s.exp_stat_sn = lr.stat_sn.wrapping_add(1);
        Ok(s)
    }

    /// [`Session::login`], then TEST UNIT READY on LUN 0 (unit attentions consumed, its
    /// status not checked): a session ready for commands. Panics if either fails.
    pub fn open(portal: SocketAddr, initiator: &str, target: &str, isid: [u8; 6]) -> Self {
        let mut s = Self::login(portal, initiator, target, isid).expect("login");
        s.ready(0).expect("TEST UNIT READY");
        s
    }

    fn send(&mut self, bhs: Bhs, data: Bytes) -> std::io::Result<()> {
        let mut q = TxQueue::new();
        q.push_pdu(bhs, data, false, false);
        self.stream.write_all(&q.take_all())
    }

    /// Receive one PDU (error on EOF or timeout).
    pub fn recv(&mut self) -> std::io::Result<Pdu> {
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match self.framer.decode(&mut self.rbuf) {
                Ok(Some(f)) => return Ok(f.pdu),
                Ok(None) => {}
                Err(e) => return Err(std::io::Error::other(e.to_string())),
            }
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.rbuf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Whether the target has closed the connection (waits up to `limit`).
    pub fn closed_within(&mut self, limit: Duration) -> bool {
        let _ = self.stream.set_read_timeout(Some(limit));
        let mut b = [0u8; 4096];
        loop {
            match self.stream.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) => {
                    return !matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    )
                }
            }
        }
    }

    /// Run a SCSI command on `lun`: `cdb`, Data-Out sent as immediate data, `read_len`
    /// bytes of Data-In expected.
    pub fn command(
        &mut self,
        lun: u8,
        cdb: &[u8],
        data_out: &[u8],
        read_len: u32,
    ) -> std::io::Result<Outcome> {
        let (itt, _) = self.send_command(lun, cdb, data_out, read_len)?;
        loop {
            if let Answer::Command(i, o) = self.next_answer()? {
                if i == itt {
                    return Ok(o);
                }
            }
        }
    }

    /// Send a SCSI command without waiting for it (Data-Out as immediate data, at most the
    /// first burst): its (ITT, CmdSN).
    pub fn send_command(
        &mut self,
        lun: u8,
        cdb: &[u8],
        data_out: &[u8],
        read_len: u32,
    ) -> std::io::Result<(u32, u32)> {
        let mut c = [0u8; 16];
        c[..cdb.len().min(16)].copy_from_slice(&cdb[..cdb.len().min(16)]);
        let itt = self.itt;
        self.itt += 1;
        let cmd_sn = self.cmd_sn;
        let cmd = ScsiCommand {
            final_bit: true,
            read: read_len > 0,
            write: !data_out.is_empty(),
            attr: 1,
            lun: [0, lun, 0, 0, 0, 0, 0, 0],
            itt,
            edtl: if data_out.is_empty() {
                read_len
            } else {
                data_out.len() as u32
            },
            cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            cdb: c,
            ..Default::default()
        };
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        self.send(cmd.encode(), Bytes::copy_from_slice(data_out))?;
        Ok((itt, cmd_sn))
    }

    /// Send a task management function (immediate) for `lun`; `rtt` and `ref_cmd_sn` name
    /// the task ABORT TASK aborts. Its ITT.
    pub fn send_tmf(
        &mut self,
        function: u8,
        lun: u8,
        rtt: u32,
        ref_cmd_sn: u32,
    ) -> std::io::Result<u32> {
        let itt = self.itt;
        self.itt += 1;
        let req = TaskMgmtRequest {
            immediate: true,
            function,
            lun: [0, lun, 0, 0, 0, 0, 0, 0],
            itt,
            rtt,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            ref_cmd_sn,
            exp_data_sn: 0,
        };
        self.send(req.encode(), Bytes::new())?;
        Ok(itt)
    }

    /// The next answer to a command or task management function (NOP-In pings are answered
    /// on the way; anything else is skipped).
    pub fn next_answer(&mut self) -> std::io::Result<Answer> {
        loop {
            let p = self.recv()?;
            match Response::decode(&p.bhs) {
                Ok(Response::DataIn(d)) => {
                    self.data_in
                        .entry(d.itt)
                        .or_default()
                        .extend_from_slice(&p.data);
                    if let Some(status) = d.status {
                        self.exp_stat_sn = d.stat_sn.wrapping_add(1);
                        let data = self.data_in.remove(&d.itt).unwrap_or_default();
                        return Ok(Answer::Command(
                            d.itt,
                            Outcome {
                                status,
                                data,
                                sense: Vec::new(),
                            },
                        ));
                    }
                }
                Ok(Response::ScsiResponse(r)) => {
                    self.exp_stat_sn = r.stat_sn.wrapping_add(1);
                    let sense = if p.data.len() > 2 {
                        p.data[2..].to_vec()
                    } else {
                        Vec::new()
                    };
                    let data = self.data_in.remove(&r.itt).unwrap_or_default();
                    return Ok(Answer::Command(
                        r.itt,
                        Outcome {
                            status: r.status,
                            data,
                            sense,
                        },
                    ));
                }
                Ok(Response::TaskMgmt(t)) => {
                    self.exp_stat_sn = t.stat_sn.wrapping_add(1);
                    return Ok(Answer::TaskMgmt(t.itt, t.response));
                }
                Ok(Response::NopIn(n)) if n.itt != u32::MAX => {
                    return Ok(Answer::Nop(n.itt));
                }
                Ok(Response::NopIn(n)) if n.ttt != u32::MAX => {
                    let out = NopOut {
                        immediate: true,
                        lun: n.lun,
                        itt: u32::MAX,
                        ttt: n.ttt,
                        cmd_sn: self.cmd_sn,
                        exp_stat_sn: self.exp_stat_sn,
                    };
                    self.send(out.encode(), Bytes::new())?;
                }
                _ => {}
            }
        }
    }

    /// Send a NOP-Out ping (immediate) that the target answers with a NOP-In: its ITT.
    pub fn send_nop(&mut self) -> std::io::Result<u32> {
        let itt = self.itt;
        self.itt += 1;
        let out = NopOut {
            immediate: true,
            lun: [0; 8],
            itt,
            ttt: u32::MAX,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
        };
        self.send(out.encode(), Bytes::new())?;
        Ok(itt)
    }

    /// How long a receive may wait (10 s after login).
    pub fn set_timeout(&mut self, limit: Duration) -> std::io::Result<()> {
        self.stream.set_read_timeout(Some(limit))
    }

    /// Close the connection at once, without logging out (a cable pulled).
    pub fn drop_connection(self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// TEST UNIT READY until GOOD (unit attentions consumed); the last outcome.
    pub fn ready(&mut self, lun: u8) -> std::io::Result<Outcome> {
        let mut last = None;
        for _ in 0..8 {
            let o = self.command(lun, &[0; 6], &[], 0)?;
            if o.status == 0 {
                return Ok(o);
            }
            last = Some(o);
        }
        Ok(last.expect("at least one attempt"))
    }
}
