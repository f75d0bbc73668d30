//! Latency statistics: a log-linear histogram (32 sub-buckets per power of two, so
//! a percentile is within about 3% of the true value; exact below 32 ns), exact
//! minimum, maximum and mean, and an SVG picture of the distribution.

use std::fmt::Write as _;

const SUB_BITS: u32 = 5;
const SUB: u64 = 1 << SUB_BITS;
const BUCKETS: usize = (SUB as usize) * (64 - SUB_BITS as usize + 1);

/// Latencies in nanoseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Histogram {
    counts: Vec<u64>,
    count: u64,
    sum: u128,
    min: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            count: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }
}

fn index(v: u64) -> usize {
    if v < SUB {
        return v as usize;
    }
    let msb = 63 - v.leading_zeros();
    let shift = msb - SUB_BITS;
    let sub = (v >> shift) & (SUB - 1);
    (SUB as usize) * (shift as usize + 1) + sub as usize
}

/// The lowest value of bucket `i` and its width.
fn bounds(i: usize) -> (u64, u64) {
    let sub = SUB as usize;
    if i < sub {
        return (i as u64, 1);
    }
    let shift = (i / sub - 1) as u32;
    let m = (i % sub) as u64;
    ((SUB + m) << shift, 1 << shift)
}

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Histogram {
        Histogram::default()
    }

    /// Adds one latency.
    pub fn record(&mut self, ns: u64) {
        self.counts[index(ns)] += 1;
        self.count += 1;
        self.sum += u128::from(ns);
        self.min = self.min.min(ns);
        self.max = self.max.max(ns);
    }

    /// Adds every sample of `other`.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// Samples.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Smallest sample (0 when empty).
    pub fn min(&self) -> u64 {
        if self.count == 0 {
            0
        } else {
            self.min
        }
    }

    /// Largest sample.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Mean (0 when empty).
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum as f64 / self.count as f64
        }
    }

    /// The value below which `p` percent of the samples lie (bucket middle, clamped
    /// to the exact minimum and maximum).
    pub fn percentile(&self, p: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((p / 100.0) * self.count as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (lo, w) = bounds(i);
                return (lo + w / 2).clamp(self.min, self.max);
            }
        }
        self.max
    }

    /// Non-empty buckets: (lowest value, width, count).
    pub fn buckets(&self) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, &c)| c > 0)
            .map(|(i, &c)| {
                let (lo, w) = bounds(i);
                (lo, w, c)
            })
    }

    /// An SVG bar chart of the distribution on a logarithmic time axis, with the
    /// median, p99 and p99.9 marked; `title` above it.
    pub fn svg(&self, title: &str) -> String {
        let (w, h) = (900.0_f64, 420.0_f64);
        let (left, right, top, bottom) = (70.0, 20.0, 50.0, 60.0);
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="24" text-anchor="middle" font-size="15">{}</text>"#,
            w / 2.0,
            escape(title)
        );
        if self.count == 0 {
            let _ = writeln!(
                s,
                r#"<text x="{left}" y="{}">no samples</text></svg>"#,
                h / 2.0
            );
            return s;
        }
        // Range: a little below the minimum to a little above the maximum.
        let lo = (self.min().max(1) as f64 * 0.9).log10();
        let hi = (self.max().max(2) as f64 * 1.1).log10().max(lo + 0.1);
        let bins = 80usize;
        let mut counts = vec![0u64; bins];
        for (b, width, c) in self.buckets() {
            let mid = (b as f64 + width as f64 / 2.0).max(1.0).log10();
            let i = (((mid - lo) / (hi - lo)) * bins as f64).floor();
            counts[(i.max(0.0) as usize).min(bins - 1)] += c;
        }
        let peak = counts.iter().copied().max().unwrap_or(1).max(1) as f64;
        let (pw, ph) = (w - left - right, h - top - bottom);
        let x_of = |ns: f64| left + (ns.max(1.0).log10() - lo) / (hi - lo) * pw;
        let bw = pw / bins as f64;
        for (i, &c) in counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            let bh = c as f64 / peak * ph;
            let _ = writeln!(
                s,
                r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="#4a7ebb"><title>{c}</title></rect>"##,
                left + i as f64 * bw,
                top + ph - bh,
                (bw - 1.0).max(0.5),
                bh
            );
        }
        // Axes.
        let _ = writeln!(
            s,
            r#"<line x1="{left}" y1="{y}" x2="{x2}" y2="{y}" stroke="black"/><line x1="{left}" y1="{top}" x2="{left}" y2="{y}" stroke="black"/>"#,
            y = top + ph,
            x2 = left + pw
        );
        let mut decade = 10f64.powf(lo.floor());
        while decade.log10() <= hi {
            for m in [1.0, 2.0, 5.0] {
                let v = decade * m;
                let lv = v.log10();
                if lv < lo || lv > hi {
                    continue;
                }
                let x = x_of(v);
                let _ = writeln!(
                    s,
                    r#"<line x1="{x:.1}" y1="{y}" x2="{x:.1}" y2="{y2}" stroke="black"/><text x="{x:.1}" y="{ty}" text-anchor="middle">{}</text>"#,
                    fmt_ns(v),
                    y = top + ph,
                    y2 = top + ph + 5.0,
                    ty = top + ph + 18.0
                );
            }
            decade *= 10.0;
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">latency (log scale)</text>"#,
            left + pw / 2.0,
            h - 15.0
        );
        let _ = writeln!(
            s,
            r#"<text x="18" y="{}" text-anchor="middle" transform="rotate(-90 18 {})">I/Os (peak {})</text>"#,
            top + ph / 2.0,
            top + ph / 2.0,
            peak as u64
        );
        for (name, p, color) in [
            ("p50", 50.0, "#2a9d2a"),
            ("p99", 99.0, "#d08000"),
            ("p99.9", 99.9, "#c02020"),
        ] {
            let v = self.percentile(p) as f64;
            let x = x_of(v);
            let _ = writeln!(
                s,
                r#"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{y}" stroke="{color}" stroke-dasharray="4 3"/><text x="{tx:.1}" y="{ty}" fill="{color}">{name} {}</text>"#,
                fmt_ns(v),
                y = top + ph,
                tx = x + 3.0,
                ty = top
                    + 12.0
                    + if name == "p99" {
                        14.0
                    } else if name == "p99.9" {
                        28.0
                    } else {
                        0.0
                    }
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

fn escape(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Nanoseconds as a short text: 850ns, 12.5us, 3.2ms, 1.1s.
pub fn fmt_ns(ns: f64) -> String {
    if ns < 1e3 {
        format!("{ns:.0}ns")
    } else if ns < 1e6 {
        format!("{}us", trim(ns / 1e3))
    } else if ns < 1e9 {
        format!("{}ms", trim(ns / 1e6))
    } else {
        format!("{}s", trim(ns / 1e9))
    }
}

fn trim(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        let t = format!("{v:.1}");
        t.strip_suffix(".0").map(str::to_string).unwrap_or(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_values() {
        for v in [
            0u64,
            1,
            31,
            32,
            33,
            63,
            64,
            1000,
            123_456,
            u64::MAX / 3,
            u64::MAX,
        ] {
            let (lo, w) = bounds(index(v));
            assert!(lo <= v && v - lo < w, "{v}: bucket {lo}+{w}");
        }
    }

    #[test]
    fn percentiles_within_a_few_percent() {
        let mut h = Histogram::new();
        for v in 1..=100_000u64 {
            h.record(v * 10);
        }
        assert_eq!(h.count(), 100_000);
        assert_eq!((h.min(), h.max()), (10, 1_000_000));
        for (p, want) in [(50.0, 500_000.0), (99.0, 990_000.0), (99.9, 999_000.0)] {
            let got = h.percentile(p) as f64;
            assert!((got - want).abs() / want < 0.035, "p{p}: {got} vs {want}");
        }
        assert!((h.mean() - 500_005.0).abs() < 1.0);
        let mut m = Histogram::new();
        m.merge(&h);
        m.merge(&Histogram::new());
        assert_eq!(m, h);
    }

    #[test]
    fn svg_is_a_document() {
        let mut h = Histogram::new();
        for v in [5_000u64, 6_000, 6_100, 7_000, 90_000] {
            h.record(v);
        }
        let svg = h.svg("4 KiB <read>");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("p99.9") && svg.contains("&lt;read&gt;"));
        assert!(Histogram::new().svg("x").contains("no samples"));
        assert_eq!(fmt_ns(12_500.0), "12.5us");
        assert_eq!(fmt_ns(850.0), "850ns");
    }
}
