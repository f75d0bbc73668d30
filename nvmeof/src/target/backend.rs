//! Namespace back ends: memory and a file (buffered), as nvmet's io-cmd-bdev.c and
//! io-cmd-file.c are its two back ends.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::RwLock;

use crate::error::{Error, Result};

/// What stores a namespace's blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backing {
    /// Zero-filled memory of `size` bytes (lost when the target stops).
    Memory {
        /// Bytes; a multiple of the block size.
        size: u64,
    },
    /// A regular file, read and written through the page cache. Created if missing;
    /// `size` (bytes) sets its length, else the file's length is used. Deallocation
    /// punches holes; Flush and FUA writes call `fdatasync`.
    File {
        /// Path of the file.
        path: PathBuf,
        /// Length to give the file, if any.
        size: Option<u64>,
    },
}

/// An opened back end.
#[derive(Debug)]
pub(crate) enum Store {
    Memory(RwLock<Vec<u8>>),
    File { file: File, len: u64 },
}

fn out_of_range() -> Error {
    Error::Config("access beyond the end of the back end".into())
}

impl Store {
    pub(crate) fn open(backing: &Backing) -> Result<Store> {
        match backing {
            Backing::Memory { size } => {
                let len = usize::try_from(*size)
                    .map_err(|_| Error::Config(format!("memory namespace of {size} bytes")))?;
                Ok(Store::Memory(RwLock::new(vec![0u8; len])))
            }
            Backing::File { path, size } => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(path)
                    .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
                if let Some(size) = size {
                    file.set_len(*size)?;
                }
                let len = file.metadata()?.len();
                Ok(Store::File { file, len })
            }
        }
    }

    /// Bytes.
    pub(crate) fn len(&self) -> u64 {
        match self {
            Store::Memory(m) => m.read().map(|v| v.len() as u64).unwrap_or(0),
            Store::File { len, .. } => *len,
        }
    }

    fn check(&self, offset: u64, len: usize) -> Result<()> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.len() => Ok(()),
            _ => Err(out_of_range()),
        }
    }

    pub(crate) fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check(offset, buf.len())?;
        match self {
            Store::Memory(m) => {
                let m = m.read().map_err(|_| Error::Config("poisoned".into()))?;
                let at = offset as usize;
                buf.copy_from_slice(&m[at..at + buf.len()]);
                Ok(())
            }
            Store::File { file, .. } => Ok(file.read_exact_at(buf, offset)?),
        }
    }

    pub(crate) fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check(offset, data.len())?;
        match self {
            Store::Memory(m) => {
                let mut m = m.write().map_err(|_| Error::Config("poisoned".into()))?;
                let at = offset as usize;
                m[at..at + data.len()].copy_from_slice(data);
                Ok(())
            }
            Store::File { file, .. } => Ok(file.write_all_at(data, offset)?),
        }
    }

    /// Makes written data durable (a no-op for memory).
    pub(crate) fn flush(&self) -> Result<()> {
        match self {
            Store::Memory(_) => Ok(()),
            Store::File { file, .. } => Ok(file.sync_data()?),
        }
    }

    /// Writes zeros over `len` bytes.
    pub(crate) fn zero(&self, offset: u64, len: u64) -> Result<()> {
        let zeros = vec![0u8; 1 << 16];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.write(offset + done, &zeros[..n])?;
            done += n as u64;
        }
        Ok(())
    }

    /// Deallocates `len` bytes: they read as zeros afterwards. Files get a hole
    /// punched (zeros written where the file system cannot punch).
    pub(crate) fn deallocate(&self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len as usize)?;
        match self {
            Store::Memory(_) => self.zero(offset, len),
            Store::File { file, .. } => {
                let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len))
                else {
                    return Err(out_of_range());
                };
                // SAFETY: fallocate on a file descriptor we own, with plain integers.
                let rc = unsafe {
                    libc::fallocate(
                        file.as_raw_fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        off,
                        n,
                    )
                };
                if rc == 0 {
                    Ok(())
                } else {
                    self.zero(offset, len)
                }
            }
        }
    }

    /// Whether the back end is a file (thin provisioned: holes).
    pub(crate) fn is_file(&self) -> bool {
        matches!(self, Store::File { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_bounds_and_zeroing() {
        let s = Store::open(&Backing::Memory { size: 4096 }).unwrap();
        s.write(100, b"abc").unwrap();
        let mut b = [0u8; 3];
        s.read(100, &mut b).unwrap();
        assert_eq!(&b, b"abc");
        assert!(s.write(4095, b"xy").is_err());
        assert!(s.read(u64::MAX, &mut b).is_err());
        s.deallocate(0, 4096).unwrap();
        s.read(100, &mut b).unwrap();
        assert_eq!(b, [0; 3]);
    }

    #[test]
    fn file_punch_hole_reads_zero() {
        let dir = std::env::temp_dir().join(format!("nvmeof-be-{}", std::process::id()));
        let s = Store::open(&Backing::File {
            path: dir.clone(),
            size: Some(1 << 20),
        })
        .unwrap();
        s.write(8192, &[0xAB; 8192]).unwrap();
        s.flush().unwrap();
        s.deallocate(8192, 4096).unwrap();
        let mut b = vec![0u8; 8192];
        s.read(8192, &mut b).unwrap();
        assert!(b[..4096].iter().all(|&x| x == 0));
        assert!(b[4096..].iter().all(|&x| x == 0xAB));
        drop(s);
        let _ = std::fs::remove_file(dir);
    }
}
