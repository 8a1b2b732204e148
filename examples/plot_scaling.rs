//! Draws the multi-core scaling figure from the JSON lines `scripts/scaling.sh` prints.
//!
//! `cargo run --release --example plot_scaling -- docs/scaling-xeon16-2026-11-25.jsonl docs/scaling.svg`

use std::collections::BTreeMap;

use plotters::prelude::*;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let input = args
        .next()
        .ok_or("usage: plot_scaling INPUT.jsonl OUTPUT.svg")?;
    let output = args
        .next()
        .ok_or("usage: plot_scaling INPUT.jsonl OUTPUT.svg")?;
    // (series, max_dim) -> workers -> matrices/s of each repetition
    let mut series: BTreeMap<(String, u64), BTreeMap<u64, Vec<f64>>> = BTreeMap::new();
    for line in std::fs::read_to_string(&input)?.lines() {
        let j: serde_json::Value = serde_json::from_str(line)?;
        let (name, rate) = match j["experiment"].as_str().unwrap_or("") {
            "workers-mk1" => ("mk1, 1 producer", j["matrices_per_s"].as_f64()),
            "matched" => ("mk1, producers = workers", j["matrices_per_s"].as_f64()),
            "workers-threads" => (
                "threads, 1 producer",
                j["systems"][0]["matrices_per_s"].as_f64(),
            ),
            _ => continue,
        };
        let (Some(rate), Some(dim), Some(w)) = (rate, j["max_dim"].as_u64(), j["workers"].as_u64())
        else {
            continue;
        };
        series
            .entry((name.to_string(), dim))
            .or_default()
            .entry(w)
            .or_default()
            .push(rate);
    }
    let dims: Vec<u64> = {
        let mut d: Vec<u64> = series.keys().map(|k| k.1).collect();
        d.sort_unstable();
        d.dedup();
        d
    };
    let root = SVGBackend::new(&output, (1000, 460)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        "mk1 scaling on a 16-core Xeon (median matrices/s)",
        ("sans-serif", 18),
    )?;
    let colors = [
        RGBColor(31, 119, 180),
        RGBColor(44, 160, 44),
        RGBColor(255, 127, 14),
    ];
    for (panel, dim) in root.split_evenly((1, dims.len().max(1))).iter().zip(&dims) {
        let lines: Vec<(&String, Vec<(u64, f64)>)> = series
            .iter()
            .filter(|(k, _)| k.1 == *dim)
            .map(|(k, pts)| {
                (
                    &k.0,
                    pts.iter()
                        .map(|(w, v)| (*w, median(&mut v.clone())))
                        .collect(),
                )
            })
            .collect();
        let top = lines
            .iter()
            .flat_map(|(_, p)| p.iter().map(|x| x.1))
            .fold(1.0, f64::max)
            * 1.1;
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("max-dim {dim}"), ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(0u64..16u64, 0.0..top)?;
        chart
            .configure_mesh()
            .x_desc("workers")
            .y_desc("matrices/s")
            .y_label_formatter(&|y| format!("{:.0}k", y / 1e3))
            .draw()?;
        for (i, (name, pts)) in lines.iter().enumerate() {
            let c = colors[i % colors.len()];
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2))
                });
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, c.filled())))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font(("sans-serif", 12))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    println!("wrote {output}");
    Ok(())
}
