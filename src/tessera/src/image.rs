//! `tessera volume import NAME FILE` and `tessera volume export NAME FILE`: copy a raw disk
//! image into a volume, or a volume out to a file, through the cluster's own iSCSI target.
//!
//! The CLI finds the volume's LUN and its owner gateway's portal in etcd and logs in there as
//! an ordinary initiator ([`crate::initiator`]), so the copy goes through the same path as any
//! client's I/O: ownership, forwarding, reservations and ACLs all apply. Commands of
//! `--io-size` bytes run `--depth` at a time. A command answered retryably (BUSY, a unit
//! attention, NOT READY while the volume changes owner) is repeated; a broken connection
//! makes the CLI find the owner again, log in again and repeat what was in flight (a write or
//! read of the same blocks twice is harmless). Progress shows as a bar on a terminal and as
//! plain lines otherwise. An export to a regular file leaves all-zero ranges as holes.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use tessera_proto::iscsi::chap::Credentials;

use crate::admin::{human_bytes, EtcdArgs};
use crate::initiator::{InitiatorError, LoginParams, Session};
use crate::progress::Progress;

/// `volume import` and `volume export`.
#[derive(Debug, Clone, clap::Args)]
pub struct ImageArgs {
    /// Volume name.
    pub name: String,
    /// The image file (or block device).
    pub file: PathBuf,
    /// Log in at this portal (host:port) instead of the volume owner's.
    #[arg(long)]
    pub portal: Option<SocketAddr>,
    /// Our initiator name (the cluster target's ACL must allow it; default
    /// iqn.2024-01.io.tessera:cli.HOSTNAME).
    #[arg(long)]
    pub initiator: Option<String>,
    /// CHAP user name, when the cluster target wants CHAP (the secret comes from the
    /// TESSERA_CHAP_SECRET environment variable, never from the command line).
    #[arg(long)]
    pub chap_user: Option<String>,
    /// Bytes per SCSI command.
    #[arg(long, default_value = "1MiB")]
    pub io_size: String,
    /// Commands in flight at once.
    #[arg(long, default_value_t = 8)]
    pub depth: usize,
    /// Overwrite an existing, non-empty output file (export).
    #[arg(long)]
    pub force: bool,
    /// Use the volume's own target (`<cluster target>:<volume>`, LUN 0; gateways with
    /// `[cluster] volume_targets`) instead of its LUN of the cluster target; a gateway that
    /// redirects sends the login to the owner.
    #[arg(long)]
    pub own_target: bool,
}

/// Where a volume is served.
#[derive(Debug, Clone)]
struct Located {
    portal: SocketAddr,
    target: String,
    lun: u64,
    size: u64,
    block_size: u32,
}

/// Find the volume, its LUN, and the portal of the gateway that owns it (any gateway when
/// none does).
async fn locate(
    e: &EtcdArgs,
    name: &str,
    portal: Option<SocketAddr>,
    own_target: bool,
) -> anyhow::Result<Located> {
    let c = crate::admin::connect(e).await?;
    let v = c
        .volume(name)
        .await?
        .with_context(|| format!("no volume named {name:?}"))?;
    let gateways = c.gateways().await?;
    let owner = c.owner(v.id).await?.map(|o| o.gateway);
    let gw = owner
        .and_then(|o| gateways.iter().find(|g| g.id == o))
        .or_else(|| gateways.iter().find(|g| !g.portals.is_empty()));
    let target = gw
        .map(|g| g.target.clone())
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| crate::config::CLUSTER_TARGET.to_string());
    let portal = match portal {
        Some(p) => p,
        None => {
            let g = gw.context("no gateway is serving the cluster")?;
            let p = g
                .portals
                .first()
                .with_context(|| format!("gateway {} has no portal", g.id))?;
            p.parse()
                .with_context(|| format!("gateway {}'s portal {p:?}", g.id))?
        }
    };
    let (target, lun) = if own_target {
        (tessera_cluster::volume_target_name(&target, &v.name), 0)
    } else {
        (target, v.lun)
    };
    Ok(Located {
        portal,
        target,
        lun,
        size: v.size,
        block_size: v.block_size,
    })
}

fn login_params(a: &ImageArgs, loc: &Located) -> anyhow::Result<LoginParams> {
    let chap = match &a.chap_user {
        Some(user) => {
            let secret = std::env::var("TESSERA_CHAP_SECRET")
                .ok()
                .filter(|s| !s.is_empty())
                .context("--chap-user needs the secret in TESSERA_CHAP_SECRET")?;
            Some(Credentials {
                user: user.clone(),
                secret: secret.into_bytes(),
            })
        }
        None => None,
    };
    Ok(LoginParams {
        portal: loc.portal,
        initiator: a.initiator.clone().unwrap_or_else(|| {
            format!("iqn.2024-01.io.tessera:cli.{}", crate::config::host_name())
        }),
        target: loc.target.clone(),
        chap,
        timeout: Duration::from_secs(30),
    })
}

fn rw16(op: u8, lba: u64, blocks: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = op;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

/// Log in and wait until the LUN is ready (unit attentions consumed); check its capacity.
fn open(p: &LoginParams, loc: &Located) -> Result<Session, anyhow::Error> {
    let mut s = Session::login(p)?;
    let start = Instant::now();
    loop {
        let o = s.command(loc.lun, &[0; 6], Bytes::new(), 0)?;
        if o.status == 0 {
            break;
        }
        anyhow::ensure!(
            o.is_retryable() && start.elapsed() < Duration::from_secs(60),
            "LUN {} at {}: TEST UNIT READY: {}",
            loc.lun,
            s.portal(),
            o.describe()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut cdb = [0u8; 16];
    cdb[0] = 0x9e;
    cdb[1] = 0x10;
    cdb[13] = 32;
    let o = s.command(loc.lun, &cdb, Bytes::new(), 32)?;
    anyhow::ensure!(
        o.status == 0 && o.data.len() >= 12,
        "LUN {} at {}: READ CAPACITY: {}",
        loc.lun,
        s.portal(),
        o.describe()
    );
    let last = u64::from_be_bytes(o.data[0..8].try_into().expect("8 bytes"));
    let bs = u32::from_be_bytes(o.data[8..12].try_into().expect("4 bytes"));
    anyhow::ensure!(
        bs == loc.block_size && (last + 1) * u64::from(bs) >= loc.size,
        "LUN {} at {} is {} blocks of {bs} bytes, not volume's {} bytes in blocks of {}",
        loc.lun,
        s.portal(),
        last + 1,
        loc.size,
        loc.block_size
    );
    Ok(s)
}

enum Dir<'a> {
    /// File → volume: the file's length.
    Import(&'a File, u64),
    /// Volume → file: whether zero ranges may be skipped (a fresh regular file).
    Export(&'a File, bool),
}

/// Copy `len` bytes from offset 0, either way, with retries and reconnection.
fn transfer(
    e: &EtcdArgs,
    a: &ImageArgs,
    mut loc: Located,
    len: u64,
    dir: Dir<'_>,
    what: &str,
    progress: &mut Progress,
) -> anyhow::Result<()> {
    let io =
        crate::config::parse_size(&a.io_size).map_err(|e| anyhow::anyhow!("--io-size: {e}"))?;
    let bs = u64::from(loc.block_size);
    anyhow::ensure!(
        io >= bs && io % bs == 0 && io <= 16 << 20,
        "--io-size must be a multiple of the volume's block size ({bs}) up to 16MiB"
    );
    let depth = a.depth.clamp(1, 128);
    let mut todo: VecDeque<u64> = (0..len.div_ceil(io)).map(|i| i * io).collect();
    let mut flight: HashMap<u32, u64> = HashMap::new();
    let mut session: Option<Session> = None;
    let mut done = 0u64;
    let start = Instant::now();
    let mut last_progress = Instant::now();
    while !todo.is_empty() || !flight.is_empty() {
        let step = (|| -> anyhow::Result<()> {
            if session.is_none() {
                if a.portal.is_none() {
                    // The owner may have changed since.
                    if let Ok(l) = crate::admin::block_on(locate(e, &a.name, None, a.own_target)) {
                        loc = l;
                    }
                }
                session = Some(open(&login_params(a, &loc)?, &loc)?);
            }
            let s = session.as_mut().expect("logged in");
            while flight.len() < depth {
                let Some(off) = todo.pop_front() else { break };
                let n = io.min(len - off);
                let blocks = n.div_ceil(bs);
                let started: anyhow::Result<u32> = match &dir {
                    Dir::Import(f, flen) => {
                        // Read straight into the buffer the command sends (no second copy).
                        let mut buf = vec![0u8; (blocks * bs) as usize];
                        let have = (*flen - off).min(n) as usize;
                        match f.read_exact_at(&mut buf[..have], off) {
                            Ok(()) => {
                                let cdb = rw16(0x8a, off / bs, blocks as u32);
                                s.submit(loc.lun, &cdb, Bytes::from(buf), 0)
                                    .map_err(Into::into)
                            }
                            Err(e) => Err(anyhow::Error::new(e)
                                .context(format!("reading the image at offset {off}"))),
                        }
                    }
                    Dir::Export(..) => {
                        let cdb = rw16(0x88, off / bs, blocks as u32);
                        s.submit(loc.lun, &cdb, Bytes::new(), (blocks * bs) as u32)
                            .map_err(Into::into)
                    }
                };
                match started {
                    Ok(itt) => {
                        flight.insert(itt, off);
                    }
                    Err(e) => {
                        // Not sent (or not known to be): it is done again after a re-login.
                        todo.push_front(off);
                        return Err(e);
                    }
                }
            }
            let (itt, o) = s.wait_any()?;
            let off = flight.remove(&itt).expect("a command of ours");
            if o.status != 0 {
                if o.is_retryable() {
                    todo.push_front(off);
                    std::thread::sleep(Duration::from_millis(20));
                    return Ok(());
                }
                anyhow::bail!(
                    "{} at offset {off}: {}",
                    if matches!(dir, Dir::Import(..)) {
                        "WRITE"
                    } else {
                        "READ"
                    },
                    o.describe()
                );
            }
            let n = io.min(len - off);
            if let Dir::Export(f, sparse) = &dir {
                anyhow::ensure!(o.data.len() as u64 >= n, "READ at offset {off}: short data");
                let data = &o.data[..n as usize];
                if !(*sparse && data.iter().all(|&b| b == 0)) {
                    f.write_all_at(data, off)
                        .with_context(|| format!("writing the image at offset {off}"))?;
                }
            }
            done += n;
            last_progress = Instant::now();
            Ok(())
        })();
        if let Err(err) = step {
            let transient = err
                .downcast_ref::<InitiatorError>()
                .is_some_and(InitiatorError::is_transient);
            anyhow::ensure!(
                transient && last_progress.elapsed() < Duration::from_secs(120),
                err
            );
            tracing::warn!("{what}: {err:#}; logging in again");
            session = None;
            todo.extend(flight.drain().map(|(_, off)| off));
            std::thread::sleep(Duration::from_millis(500));
            continue;
        }
        let secs = start.elapsed().as_secs_f64().max(1e-3);
        progress.update(
            what,
            done,
            len,
            &format!(
                "{} of {} at {}/s",
                human_bytes(done as f64),
                human_bytes(len as f64),
                human_bytes(done as f64 / secs)
            ),
        );
    }
    anyhow::ensure!(done == len, "{what}: {done} of {len} bytes copied");
    let mut s = match session.take() {
        Some(s) => s,
        None => open(&login_params(a, &loc)?, &loc)?,
    };
    if matches!(dir, Dir::Import(..)) {
        let o = s.command(
            loc.lun,
            &[0x91, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            Bytes::new(),
            0,
        )?;
        anyhow::ensure!(o.status == 0, "SYNCHRONIZE CACHE: {}", o.describe());
    }
    let secs = start.elapsed().as_secs_f64().max(1e-3);
    let msg = format!(
        "{} in {secs:.1} s, {}/s (LUN {} of {} at {})",
        human_bytes(len as f64),
        human_bytes(len as f64 / secs),
        loc.lun,
        loc.target,
        s.portal()
    );
    if let Err(e) = s.logout() {
        tracing::debug!("logout: {e}");
    }
    progress.finish(what, &format!("done: {msg}"));
    Ok(())
}

/// `tessera volume import NAME FILE`: the file's bytes become the volume's first bytes (a
/// last partial block is padded with zeros); the rest of the volume is left as it was.
pub fn import(e: &EtcdArgs, a: &ImageArgs) -> anyhow::Result<()> {
    import_with(e, a, &mut Progress::new())
}

/// [`import`], reporting progress to `progress`.
pub fn import_with(e: &EtcdArgs, a: &ImageArgs, progress: &mut Progress) -> anyhow::Result<()> {
    let mut f = File::open(&a.file).with_context(|| format!("opening {}", a.file.display()))?;
    let len = f
        .seek(SeekFrom::End(0))
        .with_context(|| format!("sizing {}", a.file.display()))?;
    let loc = crate::admin::block_on(locate(e, &a.name, a.portal, a.own_target))?;
    anyhow::ensure!(
        len <= loc.size,
        "{} is {len} bytes, more than volume {} holds ({} bytes): grow it first (tessera volume resize)",
        a.file.display(),
        a.name,
        loc.size
    );
    transfer(
        e,
        a,
        loc,
        len,
        Dir::Import(&f, len),
        &format!("import {}", a.name),
        progress,
    )?;
    println!(
        "imported {} ({len} bytes) into volume {}",
        a.file.display(),
        a.name
    );
    Ok(())
}

/// `tessera volume export NAME FILE`: the whole volume into the file (created, or a block
/// device written in place).
pub fn export(e: &EtcdArgs, a: &ImageArgs) -> anyhow::Result<()> {
    export_with(e, a, &mut Progress::new())
}

fn output(path: &Path, force: bool, size: u64) -> anyhow::Result<(File, bool)> {
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::metadata(path).ok();
    if let Some(m) = &meta {
        if m.file_type().is_block_device() {
            let f = OpenOptions::new()
                .write(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?;
            return Ok((f, false));
        }
        anyhow::ensure!(
            force || m.len() == 0,
            "{} exists and is not empty (--force overwrites it)",
            path.display()
        );
    }
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.set_len(size)
        .with_context(|| format!("sizing {}", path.display()))?;
    Ok((f, true))
}

/// [`export`], reporting progress to `progress`.
pub fn export_with(e: &EtcdArgs, a: &ImageArgs, progress: &mut Progress) -> anyhow::Result<()> {
    let loc = crate::admin::block_on(locate(e, &a.name, a.portal, a.own_target))?;
    let size = loc.size;
    let (f, sparse) = output(&a.file, a.force, size)?;
    transfer(
        e,
        a,
        loc,
        size,
        Dir::Export(&f, sparse),
        &format!("export {}", a.name),
        progress,
    )?;
    f.sync_all()
        .with_context(|| format!("flushing {}", a.file.display()))?;
    println!(
        "exported volume {} ({size} bytes) to {}",
        a.name,
        a.file.display()
    );
    Ok(())
}
