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
    Ok(Some(DeviceDax { size }))
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

    #[cfg(target_os = "linux")]
    #[test]
    fn other_char_device_is_rejected() {
        let f = File::open("/dev/null").unwrap();
        let err = probe(&f).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("not device DAX"), "{err}");
    }
}
