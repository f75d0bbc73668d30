//! Message-size lists: `8,4096,1M` or `all` (powers of two from 1 B to 1 MiB).

/// Parses one size: a number with an optional `k`/`K`/`m`/`M` suffix (binary units).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let (num, mul) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1024),
        Some('m' | 'M') => (&t[..t.len() - 1], 1024 * 1024),
        Some('g' | 'G') => (&t[..t.len() - 1], 1024 * 1024 * 1024),
        _ => (t, 1),
    };
    let n: usize = num
        .parse()
        .map_err(|_| format!("size '{s}' is not a number (examples: 8, 4k, 1M)"))?;
    n.checked_mul(mul)
        .ok_or_else(|| format!("size '{s}' is too large"))
}

/// Parses a size list: `all` or comma-separated sizes.
pub fn parse_sizes(s: &str) -> Result<Vec<usize>, String> {
    if s.trim() == "all" {
        return Ok((0..=20).map(|p| 1usize << p).collect());
    }
    let v: Result<Vec<usize>, String> = s.split(',').map(parse_size).collect();
    let v = v?;
    if v.is_empty() {
        return Err("empty size list".into());
    }
    Ok(v)
}

/// Human form: 8, 4K, 1M.
pub fn fmt_size(n: usize) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{}M", n >> 20)
    } else if n >= 1 << 10 && n.is_multiple_of(1 << 10) {
        format!("{}K", n >> 10)
    } else {
        n.to_string()
    }
}

/// Default iteration count for a size: enough for a stable median and mean, bounded
/// in time (64 MiB each way, 200 to 50,000 round trips). Small messages get 50,000
/// (about half a second at 5 us one-way): with 10,000 a single scheduler stall of a
/// few milliseconds moved a run's mean by 5%.
pub fn auto_iterations(size: usize) -> usize {
    ((64usize << 20) / size.max(1)).clamp(200, 50_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lists_and_suffixes() {
        assert_eq!(parse_sizes("8,4k,1M").unwrap(), vec![8, 4096, 1 << 20]);
        assert_eq!(parse_sizes("all").unwrap().len(), 21);
        assert_eq!(*parse_sizes("all").unwrap().last().unwrap(), 1 << 20);
        assert!(parse_sizes("8,x").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
        assert_eq!(fmt_size(65536), "64K");
        assert_eq!(fmt_size(100), "100");
        assert_eq!(auto_iterations(8), 50_000);
        assert_eq!(auto_iterations(4096), 16_384);
        assert_eq!(auto_iterations(1 << 20), 200);
    }
}
