//! `mapkv bench --plot FILE.svg`: throughput and tail latency per row, log scales.

use std::path::Path;

use plotters::prelude::*;

use crate::bench::Report;

const COLORS: [RGBColor; 3] = [
    RGBColor(66, 133, 244),
    RGBColor(244, 160, 0),
    RGBColor(219, 68, 55),
];

fn si(v: f64) -> String {
    if v >= 1e6 {
        format!("{}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{}k", v / 1e3)
    } else {
        format!("{v}")
    }
}

/// Draws the report's rows into an SVG at `path`: one group of bars per policy, populate
/// off in full colour and populate on lighter, right beside it.
pub fn draw(path: &Path, r: &Report) -> Result<(), Box<dyn std::error::Error>> {
    // One group per policy, or per value size and policy when there are several sizes.
    let group = |row: &crate::bench::Row| {
        if r.value_sizes.len() > 1 {
            format!("{} {}B", row.policy, row.value_size)
        } else {
            row.policy.clone()
        }
    };
    let mut policies: Vec<String> = Vec::new();
    for row in &r.rows {
        let g = group(row);
        if !policies.contains(&g) {
            policies.push(g);
        }
    }
    let slot = |row: &crate::bench::Row| -> (f64, f64) {
        let name = group(row);
        let g = policies.iter().position(|p| *p == name).unwrap_or(0) as f64;
        (g, if row.populate { 1.0 } else { 0.0 })
    };
    let n = policies.len().max(1) as f64;
    let root = SVGBackend::new(path, (1200, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        &format!(
            "mapkv bench: {} keys x {} B values (and as many bytes at each other size), {}; raw sync median {:.0} us; lighter bars: populate on",
            r.keys,
            r.value_size,
            r.filesystem,
            r.raw_sync_start.median_ns() as f64 / 1e3
        ),
        ("sans-serif", 17),
    )?;
    let (left, right) = root.split_horizontally(520);
    let label_of = |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 1e-6 && i >= 0.0 {
            policies
                .get(i as usize)
                .map(|s| (*s).to_owned())
                .unwrap_or_default()
        } else {
            String::new()
        }
    };
    let ticks = policies.len() * 2 + 1;

    // Throughput.
    let top = r
        .rows
        .iter()
        .map(|x| x.writes_per_s)
        .fold(10.0_f64, f64::max)
        * 3.0;
    let mut c = ChartBuilder::on(&left)
        .margin(14)
        .caption("writes/s (log scale)", ("sans-serif", 15))
        .x_label_area_size(30)
        .y_label_area_size(55)
        .build_cartesian_2d(-0.5..n - 0.5, (1.0..top).log_scale())?;
    c.configure_mesh()
        .disable_x_mesh()
        .x_labels(ticks)
        .x_label_formatter(&label_of)
        .y_label_formatter(&|v| si(*v))
        .draw()?;
    c.draw_series(r.rows.iter().map(|x| {
        let (g, p) = slot(x);
        let x0 = g - 0.36 + p * 0.37;
        let color = if x.populate {
            COLORS[0].mix(0.45)
        } else {
            COLORS[0].mix(1.0)
        };
        Rectangle::new(
            [(x0, 1.0), (x0 + 0.35, x.writes_per_s.max(1.0))],
            color.filled(),
        )
    }))?;

    // Tail latency.
    let lat_top = r
        .rows
        .iter()
        .map(|x| x.latency.p999_ns as f64 / 1e3)
        .fold(1.0_f64, f64::max)
        * 3.0;
    let mut c = ChartBuilder::on(&right)
        .margin(14)
        .caption(
            "write latency p50 / p99 / p99.9, microseconds (log scale)",
            ("sans-serif", 15),
        )
        .x_label_area_size(30)
        .y_label_area_size(55)
        .build_cartesian_2d(-0.5..n - 0.5, (0.1..lat_top).log_scale())?;
    c.configure_mesh()
        .disable_x_mesh()
        .x_labels(ticks)
        .x_label_formatter(&label_of)
        .y_label_formatter(&|v| si(*v))
        .draw()?;
    for (k, name) in ["p50", "p99", "p99.9"].iter().enumerate() {
        let base = COLORS[k];
        c.draw_series(r.rows.iter().map(|x| {
            let (g, p) = slot(x);
            let v = [x.latency.p50_ns, x.latency.p99_ns, x.latency.p999_ns][k] as f64 / 1e3;
            let x0 = g - 0.42 + p * 0.43 + k as f64 * 0.13;
            let color = if x.populate {
                base.mix(0.45)
            } else {
                base.mix(1.0)
            };
            Rectangle::new([(x0, 0.1), (x0 + 0.12, v.max(0.1))], color.filled())
        }))?
        .label(*name)
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], base.filled()));
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}
