//! PNG charts from the results JSON, drawn with plotters into an RGB buffer (font:
//! DejaVu Sans from the `dejavu` crate, so no system fonts are needed) and encoded with
//! the `png` crate.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;
use serde_json::Value;

/// Chart width, and the height of one row of panels.
const WIDTH: u32 = 1200;
const ROW_HEIGHT: u32 = 450;

fn color(mode: &str) -> RGBColor {
    match mode {
        "ebpf" => RGBColor(0, 114, 178),
        "iptables" => RGBColor(213, 94, 0),
        "nftables" => RGBColor(0, 158, 115),
        _ => RGBColor(60, 60, 60),
    }
}

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Only fails on an invalid font file, which the crate does not ship.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

/// (N, value) per mode for `pick`, skipping missing values.
fn series(results: &Value, mode: &str, pick: &dyn Fn(&Value) -> Option<f64>) -> Vec<(f64, f64)> {
    results["points"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let n = p["services"].as_f64()?;
            let v = pick(&p["modes"][mode])?;
            v.is_finite().then_some((n, v))
        })
        .collect()
}

fn n_range(results: &Value) -> (f64, f64) {
    let ns: Vec<f64> = results["points"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["services"].as_f64())
        .collect();
    let lo = ns.iter().copied().fold(f64::INFINITY, f64::min).max(1.0);
    let hi = ns.iter().copied().fold(1.0, f64::max);
    (lo / 1.5, hi * 1.5)
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

struct Panel<'a> {
    title: String,
    y_desc: &'a str,
    log_y: bool,
    modes: &'a [&'a str],
    pick: &'a dyn Fn(&Value) -> Option<f64>,
}

fn draw_panel(area: &Area, results: &Value, panel: &Panel) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", panel.title);
    let (x_lo, x_hi) = n_range(results);
    let all: Vec<(&str, Vec<(f64, f64)>)> = panel
        .modes
        .iter()
        .map(|m| (*m, series(results, m, panel.pick)))
        .collect();
    let y_max = all
        .iter()
        .flat_map(|(_, s)| s.iter().map(|p| p.1))
        .fold(0.0, f64::max)
        .max(1e-3);
    let y_min = all
        .iter()
        .flat_map(|(_, s)| s.iter().map(|p| p.1))
        .fold(f64::INFINITY, f64::min);
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(&panel.title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70);
    macro_rules! finish {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc("Services (log scale)")
                .y_desc(panel.y_desc)
                .x_label_formatter(&|x| format!("{x:.0}"))
                .y_label_formatter(&|y| {
                    if y.abs() >= 10.0 {
                        format!("{y:.0}")
                    } else {
                        format!("{y:.1}")
                    }
                })
                .label_style(("sans-serif", 15))
                .axis_desc_style(("sans-serif", 16))
                .draw()
                .map_err(|e| err(&e))?;
            for (mode, points) in &all {
                if points.is_empty() {
                    continue;
                }
                let c = color(mode);
                let style = ShapeStyle::from(&c).stroke_width(3);
                let label = if *mode == "direct" {
                    "direct (floor)".to_owned()
                } else {
                    (*mode).to_owned()
                };
                if *mode == "direct" {
                    chart
                        .draw_series(DashedLineSeries::new(points.clone(), 10, 6, style))
                        .map_err(|e| err(&e))?
                        .label(label)
                        .legend(move |(x, y)| {
                            PathElement::new(
                                vec![(x, y), (x + 24, y)],
                                ShapeStyle::from(&c).stroke_width(3),
                            )
                        });
                } else {
                    chart
                        .draw_series(LineSeries::new(points.clone(), style))
                        .map_err(|e| err(&e))?
                        .label(label)
                        .legend(move |(x, y)| {
                            PathElement::new(
                                vec![(x, y), (x + 24, y)],
                                ShapeStyle::from(&c).stroke_width(3),
                            )
                        });
                }
                chart
                    .draw_series(points.iter().map(|p| Circle::new(*p, 5, c.filled())))
                    .map_err(|e| err(&e))?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .label_font(("sans-serif", 16))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(|e| err(&e))?;
        }};
    }
    if panel.log_y {
        let (lo, hi) = ((y_min / 2.0).max(1e-3), y_max * 2.0);
        let (labelled, lines) = log_ticks(lo, hi);
        let y = (lo..hi)
            .log_scale()
            .with_key_points(labelled)
            .with_light_points(lines);
        finish!(
            builder
                .build_cartesian_2d((x_lo..x_hi).log_scale(), y)
                .map_err(|e| err(&e))?
        );
    } else {
        finish!(
            builder
                .build_cartesian_2d((x_lo..x_hi).log_scale(), 0.0..y_max * 1.25)
                .map_err(|e| err(&e))?
        );
    }
    Ok(())
}

/// Ticks for a log axis from `lo` to `hi`: labelled at 1, 2 and 5 times a power of ten
/// (only the powers over more than three decades; every multiple when that gives fewer
/// than two), light lines at the other multiples.
/// plotters' own log ticks put a light line, and within a decade a label, at every
/// multiple, which crowds and repeats labels on an axis that spans about one decade.
fn log_ticks(lo: f64, hi: f64) -> (Vec<f64>, Vec<f64>) {
    let (first, last) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
    let multiples: Vec<(u32, f64)> = (first..=last)
        .flat_map(|k| (1..=9).map(move |m| (m, f64::from(m) * 10f64.powi(k))))
        .filter(|&(_, v)| v >= lo && v <= hi)
        .collect();
    let wide = last - first > 3;
    let (labelled, lines): (Vec<_>, Vec<_>) = multiples
        .iter()
        .partition(|(m, _)| *m == 1 || (!wide && matches!(m, 2 | 5)));
    let values = |v: Vec<&(u32, f64)>| v.into_iter().map(|&(_, v)| v).collect::<Vec<_>>();
    if labelled.len() < 2 {
        return (values(multiples.iter().collect()), Vec::new());
    }
    (values(labelled), values(lines))
}

fn render(path: &Path, grid: (usize, usize), panels: &[Panel], results: &Value) -> Result<()> {
    register_font();
    let (w, h) = (WIDTH, ROW_HEIGHT * grid.0 as u32);
    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
        let areas = root.split_evenly(grid);
        for (area, panel) in areas.iter().zip(panels) {
            draw_panel(area, results, panel)?;
        }
        root.present().map_err(|e| anyhow!("{e}"))?;
    }
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), w, h);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(&buf)?;
    writer.finish()?;
    Ok(())
}

fn metric_pick(metric: &'static str, p: &'static str) -> impl Fn(&Value) -> Option<f64> {
    move |v: &Value| v[metric][p].as_f64()
}

/// `latency.png`: TCP connect and connect+request+response+close to the ClusterIP, TCP
/// connect to a pod address (no Service), and connect+request+response+close to the
/// NodePort from outside, p50 and p99, per mode.
pub fn latency_chart(path: &Path, results: &Value) -> Result<()> {
    let modes = ["ebpf", "iptables", "nftables", "direct"];
    let picks = [
        ("TCP connect, p50", metric_pick("connect", "p50_us")),
        ("TCP connect, p99", metric_pick("connect", "p99_us")),
        (
            "TCP connect+request+response+close, p50",
            metric_pick("crr", "p50_us"),
        ),
        (
            "TCP connect+request+response+close, p99",
            metric_pick("crr", "p99_us"),
        ),
        (
            "TCP connect to a pod address, no Service, p50",
            metric_pick("pod_connect", "p50_us"),
        ),
        (
            "TCP connect to a pod address, no Service, p99",
            metric_pick("pod_connect", "p99_us"),
        ),
        (
            "NodePort: TCP connect+request+response+close, p50",
            metric_pick("nodeport_crr", "p50_us"),
        ),
        (
            "NodePort: TCP connect+request+response+close, p99",
            metric_pick("nodeport_crr", "p99_us"),
        ),
    ];
    let panels: Vec<Panel> = picks
        .iter()
        .map(|(title, pick)| Panel {
            title: (*title).to_owned(),
            y_desc: if title.ends_with("p99") {
                "µs (log scale)"
            } else {
                "µs"
            },
            log_y: title.ends_with("p99"),
            modes: &modes,
            pick,
        })
        .collect();
    render(path, (4, 2), &panels, results)
}

/// `programming.png`: programming from empty and one endpoint change, per mode.
pub fn programming_chart(path: &Path, results: &Value) -> Result<()> {
    let modes = ["ebpf", "iptables", "nftables"];
    let programming = |v: &Value| v["programming_ms"].as_f64();
    let change = |v: &Value| v["endpoint_change_median_ms"].as_f64();
    let panels = [
        Panel {
            title: "Programming N Services from empty".into(),
            y_desc: "ms (log scale)",
            log_y: true,
            modes: &modes,
            pick: &programming,
        },
        Panel {
            title: "One endpoint change at N Services (median)".into(),
            y_desc: "ms (log scale)",
            log_y: true,
            modes: &modes,
            pick: &change,
        },
    ];
    render(path, (2, 1), &panels, results)
}

#[cfg(test)]
mod tests {
    use super::log_ticks;

    #[test]
    fn a_log_axis_is_labelled_at_one_two_and_five() {
        assert_eq!(
            log_ticks(85.0, 1622.0),
            (
                vec![100.0, 200.0, 500.0, 1000.0],
                vec![90.0, 300.0, 400.0, 600.0, 700.0, 800.0, 900.0]
            )
        );
        assert_eq!(
            log_ticks(0.2, 30.0).0,
            [0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0]
        );
        assert_eq!(
            log_ticks(4.0, 150000.0).0,
            [10.0, 100.0, 1000.0, 10000.0, 100000.0]
        );
        // Too narrow for two of them: every multiple is labelled.
        assert_eq!(log_ticks(210.0, 480.0), (vec![300.0, 400.0], vec![]));
    }
}
