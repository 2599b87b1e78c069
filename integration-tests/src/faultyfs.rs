//! A FUSE file system of the test's own holding one file, `store`, kept in a real file
//! elsewhere, whose `fsync`/`fdatasync` can be made to fail on demand (EIO), as a dying disk's
//! would: a storage node with its store on it meets a failed sync for real, through the
//! kernel, with nothing in the node built for the test.
//!
//! Files are opened in direct-I/O mode (no page cache in between): every write the node makes
//! reaches this process, and a sync answered with an error is the sync the node asked for.
//! Mounting needs `/dev/fuse` and root (the `mount(2)` call is made directly).

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    FileAttr, FileType, Filesystem, MountOption, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, TimeOrNow,
};

const ROOT: u64 = 1;
const FILE: u64 = 2;
const NAME: &str = "store";
const TTL: Duration = Duration::from_secs(1);
const EIO: i32 = 5;
const ENOENT: i32 = 2;
const EPERM: i32 = 1;

/// What the test controls and observes of a mounted [`FaultyFs`].
#[derive(Default)]
pub struct Faults {
    /// Answer every `fsync`/`fdatasync` with EIO from now on.
    pub fail_syncs: AtomicBool,
    /// Syncs asked for.
    pub syncs: AtomicU64,
    /// Syncs answered with EIO.
    pub failed_syncs: AtomicU64,
}

struct FaultyFs {
    backing: PathBuf,
    file: Option<File>,
    faults: Arc<Faults>,
}

impl FaultyFs {
    fn attr(&self, ino: u64) -> FileAttr {
        let (kind, perm, nlink, size) = if ino == ROOT {
            (FileType::Directory, 0o755, 2, 0)
        } else {
            let size = self
                .file
                .as_ref()
                .and_then(|f| f.metadata().ok())
                .map_or(0, |m| m.len());
            (FileType::RegularFile, 0o644, 1, size)
        };
        FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: SystemTime::UNIX_EPOCH,
            mtime: SystemTime::UNIX_EPOCH,
            ctime: SystemTime::UNIX_EPOCH,
            crtime: SystemTime::UNIX_EPOCH,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn open_backing(&mut self) -> std::io::Result<()> {
        if self.file.is_none() {
            self.file = Some(
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&self.backing)?,
            );
        }
        Ok(())
    }
}

impl Filesystem for FaultyFs {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        if parent == ROOT && name == NAME && self.file.is_some() {
            reply.entry(&TTL, &self.attr(FILE), 0);
        } else {
            reply.error(ENOENT);
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match ino {
            ROOT => reply.attr(&TTL, &self.attr(ROOT)),
            FILE if self.file.is_some() => reply.attr(&TTL, &self.attr(FILE)),
            _ => reply.error(ENOENT),
        }
    }

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        if let (FILE, Some(size), Some(f)) = (ino, size, self.file.as_ref()) {
            if f.set_len(size).is_err() {
                reply.error(EIO);
                return;
            }
        }
        reply.attr(&TTL, &self.attr(ino));
    }

    fn create(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        if parent != ROOT || name != NAME {
            reply.error(EPERM);
            return;
        }
        if self.open_backing().is_err() {
            reply.error(EIO);
            return;
        }
        reply.created(&TTL, &self.attr(FILE), 0, 0, fuser::consts::FOPEN_DIRECT_IO);
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        match ino {
            FILE if self.file.is_some() => reply.opened(0, fuser::consts::FOPEN_DIRECT_IO),
            ROOT => reply.opened(0, 0),
            _ => reply.error(ENOENT),
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let Some(f) = self.file.as_ref() else {
            reply.error(ENOENT);
            return;
        };
        let mut buf = vec![0u8; size as usize];
        let mut done = 0;
        while done < buf.len() {
            match f.read_at(&mut buf[done..], offset as u64 + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(_) => {
                    reply.error(EIO);
                    return;
                }
            }
        }
        reply.data(&buf[..done]);
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        match self
            .file
            .as_ref()
            .map(|f| f.write_all_at(data, offset as u64))
        {
            Some(Ok(())) => reply.written(data.len() as u32),
            _ => reply.error(EIO),
        }
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _lock: u64, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsync(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _data: bool, reply: ReplyEmpty) {
        self.faults.syncs.fetch_add(1, Ordering::Relaxed);
        if self.faults.fail_syncs.load(Ordering::Relaxed) {
            self.faults.failed_syncs.fetch_add(1, Ordering::Relaxed);
            reply.error(EIO);
            return;
        }
        match self.file.as_ref().map(File::sync_data) {
            Some(Ok(())) => reply.ok(),
            _ => reply.error(EIO),
        }
    }

    fn fallocate(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        offset: i64,
        length: i64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let Some(f) = self.file.as_ref() else {
            reply.error(ENOENT);
            return;
        };
        let mode = nix::fcntl::FallocateFlags::from_bits_truncate(mode);
        match nix::fcntl::fallocate(f.as_raw_fd(), mode, offset, length) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e as i32),
        }
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        if ino != ROOT {
            reply.error(ENOENT);
            return;
        }
        let mut entries = vec![
            (ROOT, FileType::Directory, "."),
            (ROOT, FileType::Directory, ".."),
        ];
        if self.file.is_some() {
            entries.push((FILE, FileType::RegularFile, NAME));
        }
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(ino, (i + 1) as i64, kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// A mounted [`FaultyFs`]: unmounted when dropped.
pub struct FaultyMount {
    _session: fuser::BackgroundSession,
    /// The mount point; the file is `mountpoint/store`.
    pub mountpoint: PathBuf,
    /// The switches.
    pub faults: Arc<Faults>,
}

impl FaultyMount {
    /// Mount at `mountpoint` (an empty directory) a file system whose one file, `store`, is
    /// kept in `backing` (created when the file is).
    pub fn mount(mountpoint: &Path, backing: &Path) -> std::io::Result<Self> {
        let faults = Arc::new(Faults::default());
        let fs = FaultyFs {
            backing: backing.to_path_buf(),
            file: None,
            faults: faults.clone(),
        };
        let session = fuser::spawn_mount2(
            fs,
            mountpoint,
            &[
                MountOption::FSName("tessera-faulty".into()),
                MountOption::RW,
            ],
        )?;
        Ok(Self {
            _session: session,
            mountpoint: mountpoint.to_path_buf(),
            faults,
        })
    }

    /// The file's path.
    pub fn file(&self) -> PathBuf {
        self.mountpoint.join(NAME)
    }
}
