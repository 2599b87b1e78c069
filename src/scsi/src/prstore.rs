//! Where persistent reservation state lives between gateway restarts.
//!
//! A logical unit saves its encoded PR state (see `tessera_proto::scsi::pr`) through a
//! [`PrStore`] after every PERSISTENT RESERVE OUT that changes it, before completing the
//! command, and loads it when the logical unit is created. [`FilePrStore`] keeps it in one
//! file, replaced atomically. (The cluster keeps it in etcd through another implementation.)

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Durable storage for one logical unit's persistent reservation state.
pub trait PrStore: Send + Sync {
    /// The last saved state, or `None` if nothing was ever saved.
    fn load(&self) -> io::Result<Option<Vec<u8>>>;
    /// Replace the saved state; durable when this returns `Ok`.
    fn save(&self, state: &[u8]) -> io::Result<()>;
}

/// A [`PrStore`] backed by one file: writes go to `<path>.tmp`, are fsynced, renamed over
/// `<path>`, and the directory is fsynced, so a crash leaves either the old or the new state.
#[derive(Debug, Clone)]
pub struct FilePrStore {
    path: PathBuf,
}

impl FilePrStore {
    /// A store keeping its state in `path` (the file need not exist yet).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The file the state is kept in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn tmp_path(&self) -> PathBuf {
        let mut name = self
            .path
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        name.push(".tmp");
        self.path.with_file_name(name)
    }
}

impl PrStore for FilePrStore {
    fn load(&self) -> io::Result<Option<Vec<u8>>> {
        match fs::read(&self.path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn save(&self, state: &[u8]) -> io::Result<()> {
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        fs::create_dir_all(dir)?;
        let tmp = self.tmp_path();
        {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            f.write_all(state)?;
            f.sync_all()?;
        }
        fs::rename(&tmp, &self.path)?;
        File::open(dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_replace() {
        let dir = tempfile::tempdir().unwrap();
        let s = FilePrStore::new(dir.path().join("pr").join("lun0.pr"));
        assert_eq!(s.load().unwrap(), None);
        s.save(b"one").unwrap();
        assert_eq!(s.load().unwrap().as_deref(), Some(&b"one"[..]));
        s.save(b"two!").unwrap();
        assert_eq!(s.load().unwrap().as_deref(), Some(&b"two!"[..]));
        assert!(!s.tmp_path().exists());
    }
}
