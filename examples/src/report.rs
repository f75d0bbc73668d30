//! Report output: aligned plain-text tables, Markdown tables, and an SVG plot of
//! latency and bandwidth against message size, one line per series.

use std::fmt::Write as _;

use serde::Serialize;

use crate::sizes::fmt_size;

/// A table: header and rows of cells.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Table {
    /// Title printed above.
    pub title: String,
    /// Column names.
    pub header: Vec<String>,
    /// Rows.
    pub rows: Vec<Vec<String>>,
}

impl Table {
    /// Plain text with aligned columns (first column left, others right).
    pub fn to_text(&self) -> String {
        let cols = self.header.len();
        let mut w = vec![0usize; cols];
        for r in std::iter::once(&self.header).chain(&self.rows) {
            for (i, c) in r.iter().enumerate().take(cols) {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let mut s = String::new();
        if !self.title.is_empty() {
            let _ = writeln!(s, "{}", self.title);
        }
        for r in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, c) in r.iter().enumerate().take(cols) {
                if i == 0 {
                    let _ = write!(line, "{c:<width$}", width = w[i]);
                } else {
                    let _ = write!(line, "  {c:>width$}", width = w[i]);
                }
            }
            let _ = writeln!(s, "{}", line.trim_end());
        }
        s
    }

    /// A Markdown table (with the title as a bold line above).
    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        if !self.title.is_empty() {
            let _ = writeln!(s, "**{}**\n", self.title);
        }
        let _ = writeln!(s, "| {} |", self.header.join(" | "));
        let _ = writeln!(
            s,
            "|{}|",
            self.header
                .iter()
                .enumerate()
                .map(|(i, _)| if i == 0 { " --- " } else { " ---: " })
                .collect::<Vec<_>>()
                .join("|")
        );
        for r in &self.rows {
            let _ = writeln!(s, "| {} |", r.join(" | "));
        }
        s
    }
}

/// One line of a plot.
#[derive(Debug, Clone, Serialize)]
pub struct Line {
    /// Legend label.
    pub label: String,
    /// (message size, value) points.
    pub points: Vec<(usize, f64)>,
    /// Drawn dashed: a limit (a raw-socket reference), not a measured provider.
    pub dashed: bool,
}

const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
];

fn log_range(lines: &[Line]) -> (f64, f64) {
    let vals = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .filter(|v| *v > 0.0);
    let (mut lo, mut hi) = (f64::MAX, f64::MIN);
    for v in vals {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if lo > hi {
        return (0.0, 1.0);
    }
    let (lo, hi) = (lo.log10().floor(), hi.log10().ceil());
    if hi <= lo {
        (lo, lo + 1.0)
    } else {
        (lo, hi)
    }
}

fn panel(svg: &mut String, x0: f64, title: &str, ylabel: &str, lines: &[Line], sizes: &[usize]) {
    let (w, h, left, top, bottom) = (460.0, 330.0, 60.0, 40.0, 50.0);
    let pw = w - left - 20.0;
    let ph = h - top - bottom;
    let (smin, smax) = (
        sizes.iter().copied().min().unwrap_or(1).max(1) as f64,
        sizes.iter().copied().max().unwrap_or(2).max(2) as f64,
    );
    let (lx0, lx1) = (smin.log2(), smax.log2().max(smin.log2() + 1.0));
    let (ly0, ly1) = log_range(lines);
    let px = |s: f64| x0 + left + (s.max(1.0).log2() - lx0) / (lx1 - lx0) * pw;
    let py = |v: f64| top + ph - (v.max(1e-9).log10() - ly0) / (ly1 - ly0) * ph;
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="22" font-size="15" text-anchor="middle" font-weight="bold">{title}</text>"#,
        x0 + left + pw / 2.0
    );
    let _ = writeln!(
        svg,
        r##"<rect x="{}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>"##,
        x0 + left
    );
    // Y grid at powers of ten.
    let mut e = ly0;
    while e <= ly1 + 1e-9 {
        let y = py(10f64.powf(e));
        let _ = writeln!(
            svg,
            r##"<line x1="{}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" font-size="11" text-anchor="end">{}</text>"##,
            x0 + left,
            x0 + left + pw,
            x0 + left - 4.0,
            y + 4.0,
            fmt_value(10f64.powf(e))
        );
        e += 1.0;
    }
    for &s in sizes {
        let x = px(s as f64);
        let _ = writeln!(
            svg,
            r##"<line x1="{x}" y1="{}" x2="{x}" y2="{}" stroke="#444"/><text x="{x}" y="{}" font-size="10" text-anchor="middle">{}</text>"##,
            top + ph,
            top + ph + 4.0,
            top + ph + 16.0,
            fmt_size(s)
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" font-size="12" text-anchor="middle">message size (bytes)</text>"#,
        x0 + left + pw / 2.0,
        h - 12.0
    );
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" font-size="12" text-anchor="middle" transform="rotate(-90 {} {})">{ylabel}</text>"#,
        x0 + 14.0,
        top + ph / 2.0,
        x0 + 14.0,
        top + ph / 2.0
    );
    for (i, l) in lines.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<String> = l
            .points
            .iter()
            .filter(|p| p.1 > 0.0)
            .map(|&(s, v)| format!("{:.1},{:.1}", px(s as f64), py(v)))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2"{} points="{}"/>"#,
            dash(l.dashed),
            pts.join(" ")
        );
        for p in &pts {
            let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(svg, r#"<circle cx="{x}" cy="{y}" r="2.5" fill="{color}"/>"#);
        }
    }
}

/// The stroke attribute of a dashed (limit) line.
fn dash(dashed: bool) -> &'static str {
    if dashed {
        r#" stroke-dasharray="6 4""#
    } else {
        ""
    }
}

fn fmt_value(v: f64) -> String {
    if v >= 1.0 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

/// Two panels side by side (latency, bandwidth; log scales) with a shared legend.
pub fn svg_plot(latency: &[Line], bandwidth: &[Line]) -> String {
    let mut sizes: Vec<usize> = latency
        .iter()
        .chain(bandwidth)
        .flat_map(|l| l.points.iter().map(|p| p.0))
        .collect();
    sizes.sort_unstable();
    sizes.dedup();
    let labels: Vec<(&str, bool)> = {
        let mut v: Vec<(&str, bool)> = Vec::new();
        for l in latency.iter().chain(bandwidth) {
            if !v.iter().any(|x| x.0 == l.label) {
                v.push((&l.label, l.dashed));
            }
        }
        v
    };
    let legend_h = 20.0 * labels.len() as f64 + 10.0;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="920" height="{}" font-family="sans-serif">"#,
        330.0 + legend_h
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    // Colors follow the legend order, so the same series has one color in both panels.
    let recolor = |lines: &[Line]| -> Vec<Line> {
        let mut out = Vec::new();
        for (label, dashed) in &labels {
            match lines.iter().find(|l| &l.label == label) {
                Some(l) => out.push(l.clone()),
                None => out.push(Line {
                    label: label.to_string(),
                    points: Vec::new(),
                    dashed: *dashed,
                }),
            }
        }
        out
    };
    panel(
        &mut svg,
        0.0,
        "Ping-pong latency (one-way)",
        "microseconds",
        &recolor(latency),
        &sizes,
    );
    panel(
        &mut svg,
        460.0,
        "Ping-pong bandwidth",
        "MB/s",
        &recolor(bandwidth),
        &sizes,
    );
    for (i, (label, dashed)) in labels.iter().enumerate() {
        let y = 345.0 + 20.0 * i as f64;
        let color = COLORS[i % COLORS.len()];
        let _ = writeln!(
            svg,
            r#"<line x1="70" y1="{y}" x2="100" y2="{y}" stroke="{color}" stroke-width="3"{}/><text x="108" y="{}" font-size="13">{}{}</text>"#,
            dash(*dashed),
            y + 4.0,
            xml_escape(label),
            if *dashed { " (limit, dashed)" } else { "" }
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_markdown_tables() {
        let t = Table {
            title: "T".into(),
            header: vec!["size".into(), "tcp".into()],
            rows: vec![
                vec!["8".into(), "4.10".into()],
                vec!["64K".into(), "12.5".into()],
            ],
        };
        let text = t.to_text();
        assert!(text.contains("size   tcp"), "{text}");
        assert!(text.contains("64K   12.5"), "{text}");
        let md = t.to_markdown();
        assert!(md.contains("| size | tcp |"));
        assert!(md.contains("| --- | ---: |"));
        assert!(md.contains("| 64K | 12.5 |"));
    }

    #[test]
    fn svg_has_one_polyline_per_series_and_panel() {
        let l = vec![
            Line {
                label: "a<b".into(),
                points: vec![(8, 5.0), (1024, 7.0)],
                dashed: false,
            },
            Line {
                label: "c".into(),
                points: vec![(8, 3.0), (1024, 4.0)],
                dashed: true,
            },
        ];
        let svg = svg_plot(&l, &l);
        assert_eq!(svg.matches("<polyline").count(), 4);
        // The limit line is dashed in both panels and in the legend; the other not.
        assert_eq!(svg.matches("stroke-dasharray").count(), 3, "{svg}");
        assert!(svg.contains("c (limit, dashed)"));
        assert!(svg.contains("a&lt;b"));
        assert!(svg.starts_with("<svg"));
    }
}
