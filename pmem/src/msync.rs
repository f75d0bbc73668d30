//! `msync(MS_SYNC)` on page-aligned ranges: persistence for ordinary files.

use std::io;
use std::sync::OnceLock;

/// The system page size (from `sysconf(_SC_PAGESIZE)`, read once; 4096 if
/// that fails).
pub fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf has no preconditions.
        let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        match usize::try_from(n) {
            Ok(n) if n.is_power_of_two() => n,
            _ => 4096,
        }
    })
}

/// Writes back `[addr, addr + len)` of a file mapping to its file and waits
/// for the write (`msync(MS_SYNC)`), after widening the range to whole pages as
/// msync requires.
///
/// Once this returns `Ok` on an ordinary file system the data is durable (as
/// far as the storage device honours cache flushes). On tmpfs it does nothing
/// useful: tmpfs is memory. On a DAX file system it also writes back the CPU
/// caches.
///
/// A zero `len` does nothing. Errors are msync's: `ENOMEM` if the range is not
/// mapped, `EINVAL`/`InvalidInput` if it wraps around the address space.
///
/// This function is safe: msync neither reads nor writes the memory on the
/// caller's behalf, it only asks the kernel to write back pages.
pub fn msync(addr: *const u8, len: usize) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let page = page_size();
    let start = addr as usize & !(page - 1);
    let end = (addr as usize).checked_add(len).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "msync range wraps the address space",
        )
    })?;
    // SAFETY: msync does not access the range from user space; an unmapped or
    // invalid range makes it fail with an error, which we return.
    let rc = unsafe { libc::msync(start as *mut libc::c_void, end - start, libc::MS_SYNC) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_size_is_a_power_of_two() {
        assert!(page_size().is_power_of_two());
        assert!(page_size() >= 4096);
    }

    #[test]
    fn unmapped_range_is_an_error() {
        // Page 0 is never mapped in a Linux process.
        let err = msync(std::ptr::null::<u8>().wrapping_add(16), 32).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOMEM));
    }

    #[test]
    fn wrapping_range_is_invalid_input() {
        let err = msync(usize::MAX as *const u8, 2).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn zero_length_is_ok_anywhere() {
        msync(std::ptr::null(), 0).unwrap();
    }
}
