//! Charts as server-side SVG, written with maud: a line chart of a few series over time buckets
//! and a horizontal bar of use against a limit. Every data point is a circle carrying its bucket
//! and value (`data-bucket`, `data-value`) and a tooltip, so the figures can be read back from
//! the page; no JavaScript is needed to see them.

use crate::usage::Chart;
use maud::{Markup, html};

const W: f64 = 640.0;
const H: f64 = 200.0;
const LEFT: f64 = 56.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = 28.0;
/// Series colours, in order (colour-blind safe).
const COLOURS: [&str; 6] = [
    "#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9",
];

/// A figure as a label: whole numbers without decimals, others with up to four significant ones.
pub fn fmt(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else {
        let s = format!("{v:.6}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// A "nice" upper bound for the y axis: 1, 2 or 5 times a power of ten.
fn nice_max(max: f64) -> f64 {
    if max <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(max.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|&v| v >= max)
        .unwrap_or(10.0 * p)
}

/// The bucket label as shown under the axis: the time part for minutes and hours, the date for
/// days.
fn short(label: &str) -> &str {
    match label.len() {
        16 => &label[11..],
        13 => &label[11..],
        10 => &label[5..],
        _ => label,
    }
}

pub fn line_chart(c: &Chart) -> Markup {
    let n = c.labels.len().max(1);
    let max = nice_max(
        c.series
            .iter()
            .flat_map(|s| s.values.iter().copied())
            .fold(0.0, f64::max),
    );
    let plot_w = W - LEFT - RIGHT;
    let plot_h = H - TOP - BOTTOM;
    let x = |i: usize| {
        if n == 1 {
            LEFT + plot_w / 2.0
        } else {
            LEFT + plot_w * i as f64 / (n - 1) as f64
        }
    };
    let y = |v: f64| TOP + plot_h - plot_h * (v / max);
    let total: f64 = c.series.iter().flat_map(|s| s.values.iter()).sum();
    let every = (n / 6).max(1);
    html! {
        figure.chart id=(format!("chart-{}", c.id)) data-total=(fmt(total)) {
            figcaption { (c.title) " " span.unit { "(" (c.unit) ")" } }
            svg xmlns="http://www.w3.org/2000/svg" viewBox=(format!("0 0 {W} {H}")) role="img"
                aria-label=(format!("{} per bucket", c.title)) {
                // Grid and y labels: 0, half, max.
                @for f in [0.0, 0.5, 1.0] {
                    line.grid x1=(LEFT) x2=(W - RIGHT) y1=(y(max * f)) y2=(y(max * f)) {}
                    text.ylabel x=(LEFT - 6.0) y=(y(max * f) + 4.0) text-anchor="end" { (fmt(max * f)) }
                }
                @for (i, l) in c.labels.iter().enumerate() {
                    @if i % every == 0 || i + 1 == n {
                        text.xlabel x=(x(i)) y=(H - 8.0) text-anchor="middle" { (short(l)) }
                    }
                }
                @for (k, s) in c.series.iter().enumerate() {
                    @let colour = COLOURS[k % COLOURS.len()];
                    @let points = s.values.iter().enumerate()
                        .map(|(i, v)| format!("{:.1},{:.1}", x(i), y(*v)))
                        .collect::<Vec<_>>().join(" ");
                    g.series data-series=(s.name) {
                        polyline points=(points) fill="none" stroke=(colour) stroke-width="2" {}
                        @for (i, v) in s.values.iter().enumerate() {
                            circle.pt cx=(format!("{:.1}", x(i))) cy=(format!("{:.1}", y(*v)))
                                r=(if *v > 0.0 { "3" } else { "1.5" }) fill=(colour)
                                data-bucket=(c.labels[i]) data-value=(fmt(*v)) {
                                title { (s.name) " " (c.labels[i]) ": " (fmt(*v)) }
                            }
                        }
                    }
                }
            }
            ul.legend {
                @for (k, s) in c.series.iter().enumerate() {
                    li { svg.swatch viewBox="0 0 10 10" width="10" height="10" {
                            rect width="10" height="10" fill=(COLOURS[k % COLOURS.len()]) {}
                        }
                        " " (s.name) ": " (fmt(s.values.iter().sum())) }
                }
            }
        }
    }
}

/// Use against a limit as a bar (red from 90 %).
pub fn bar(used: f64, limit: f64) -> Markup {
    let share = if limit > 0.0 {
        (used / limit).clamp(0.0, 1.0)
    } else {
        1.0
    };
    let colour = if share >= 0.9 { "#d55e00" } else { "#009e73" };
    html! {
        svg.bar viewBox="0 0 200 12" width="200" height="12" role="img"
            aria-label=(format!("{} of {}", fmt(used), fmt(limit))) {
            rect width="200" height="12" fill="#e5e5e5" {}
            rect width=(format!("{:.1}", 200.0 * share)) height="12" fill=(colour) {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::Series;

    #[test]
    fn every_value_is_a_point_with_its_figure() {
        let c = Chart {
            id: "t".into(),
            title: "T".into(),
            unit: "u".into(),
            labels: vec!["2026-12-01".into(), "2026-12-02".into()],
            series: vec![Series {
                name: "a".into(),
                values: vec![3.0, 0.5],
            }],
        };
        let svg = line_chart(&c).into_string();
        assert_eq!(svg.matches("<circle").count(), 2);
        assert!(svg.contains(r#"data-value="3""#), "{svg}");
        assert!(svg.contains(r#"data-value="0.5""#), "{svg}");
        assert!(svg.contains(r#"data-total="3.5""#), "{svg}");
    }

    #[test]
    fn axis_bounds_are_round() {
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(nice_max(7.0), 10.0);
        assert_eq!(nice_max(130.0), 200.0);
        assert_eq!(nice_max(0.004), 0.005);
    }
}
