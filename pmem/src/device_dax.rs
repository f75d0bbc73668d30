//! Device DAX (`/dev/daxX.Y`): a character device that maps persistent memory
//! directly, with no file system and no page cache.

use std::fs::File;
use std::io;
#[cfg(target_os = "linux")]
use std::path::PathBuf;

/// What the kernel says about a device DAX character device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DeviceDax {
    /// Usable size in bytes (`/sys/dev/char/M:m/size`).
    pub size: u64,
    /// The device's mapping alignment (`/sys/dev/char/M:m/align`, Linux 5.10 and
    /// later; 2 MiB by default, also 4 KiB or 1 GiB): mmap lengths must be
    /// multiples of it. `None` where the kernel does not say.
    pub align: Option<u64>,
}

impl DeviceDax {
    /// `len` rounded up to the device alignment (unchanged if it is unknown).
    pub fn map_len(&self, len: usize) -> usize {
        match self.align {
            Some(a) if a > 1 => match usize::try_from(a) {
                Ok(a) => len.div_ceil(a).saturating_mul(a),
                Err(_) => len,
            },
            _ => len,
        }
    }
}

/// `Ok(None)` if `file` is not a character device; `Ok(Some)` if it is device
/// DAX; an error for any other character device (they cannot hold data).
#[cfg(target_os = "linux")]
pub(crate) fn probe(file: &File) -> io::Result<Option<DeviceDax>> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    let meta = file.metadata()?;
    if !meta.file_type().is_char_device() {
        return Ok(None);
    }
    let rdev = meta.rdev();
    let sys = PathBuf::from(format!(
        "/sys/dev/char/{}:{}",
        libc::major(rdev),
        libc::minor(rdev)
    ));
    let subsystem = std::fs::read_link(sys.join("subsystem")).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("character device without a sysfs subsystem ({e}): not device DAX"),
        )
    })?;
    if subsystem.file_name().and_then(|n| n.to_str()) != Some("dax") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "character device of subsystem {:?}, not device DAX",
                subsystem.file_name().unwrap_or_default()
            ),
        ));
    }
    let size_path = sys.join("size");
    let text = std::fs::read_to_string(&size_path)?;
    let size = text.trim().parse::<u64>().map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {text:?}: {e}", size_path.display()),
        )
    })?;
    let align = std::fs::read_to_string(sys.join("align"))
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
        .filter(|&a| a > 0);
    Ok(Some(DeviceDax { size, align }))
}

/// Device DAX exists only on Linux.
#[cfg(not(target_os = "linux"))]
pub(crate) fn probe(_file: &File) -> io::Result<Option<DeviceDax>> {
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_file_is_not_device_dax() {
        let f = tempfile::tempfile().unwrap();
        assert_eq!(probe(&f).unwrap(), None);
    }

    #[test]
    fn map_len_rounds_up_to_the_alignment() {
        let dax = |align| DeviceDax {
            size: 1 << 30,
            align,
        };
        let two_mib = 2 << 20;
        assert_eq!(dax(Some(two_mib)).map_len(1), 2 << 20);
        assert_eq!(dax(Some(two_mib)).map_len(2 << 20), 2 << 20);
        assert_eq!(dax(Some(two_mib)).map_len((2 << 20) + 1), 4 << 20);
        assert_eq!(dax(Some(4096)).map_len(5000), 8192);
        assert_eq!(dax(None).map_len(5000), 5000);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn other_char_device_is_rejected() {
        let f = File::open("/dev/null").unwrap();
        let err = probe(&f).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("not device DAX"), "{err}");
    }
}
