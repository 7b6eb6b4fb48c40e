//! `sim run --report FILE.svg`: draws what a run did, so a person sees at a glance when
//! crashes struck and how the work recovered: segment completions over simulated time
//! with a mark at each node crash, and the latency of tasks by priority class.

use std::path::Path;

use plotters::prelude::*;

use crate::report::{class, quantile, Report};

/// The chart could not be drawn or written.
#[derive(Debug, thiserror::Error)]
#[error("cannot draw the report {path}: {reason}")]
pub struct PlotError {
    /// Where it was to go.
    pub path: String,
    /// What went wrong.
    pub reason: String,
}

/// Points kept per line: enough for a smooth curve, few enough for a light file.
const MAX_POINTS: usize = 2_000;

/// Draws the report of a run as an SVG file at `path`.
pub fn draw_svg(report: &Report, path: &Path) -> Result<(), PlotError> {
    let fail = |e: &dyn std::fmt::Display| PlotError {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let root = SVGBackend::new(path, (1000, 820)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let (top, bottom) = root.split_vertically(420);
    completions(report, &top).map_err(|e| fail(&e))?;
    latencies(report, &bottom).map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))?;
    Ok(())
}

/// At most about [`MAX_POINTS`] of `values`, evenly spaced, the last one always kept,
/// with their indices.
fn thinned<T>(values: &[T]) -> impl Iterator<Item = (usize, &T)> {
    let step = values.len().div_ceil(MAX_POINTS).max(1);
    values
        .iter()
        .enumerate()
        .filter(move |(i, _)| (i + 1) % step == 0 || i + 1 == values.len())
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;
type DrawResult<'a> =
    Result<(), DrawingAreaErrorKind<<SVGBackend<'a> as DrawingBackend>::ErrorType>>;

/// Cumulative segment completions over simulated seconds, a red line at each crash.
fn completions<'a>(report: &Report, area: &Area<'a>) -> DrawResult<'a> {
    let done = report.completions_us();
    let crashes = report.crashes_us();
    let end_s = (report.simulated_ms / 1000.0).max(0.001);
    let total = done.len().max(1) as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!(
                "{} (seed {}): segment results accepted, {} node crashes",
                report.workload,
                report.seed,
                crashes.len()
            ),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..end_s, 0f64..total * 1.05)?;
    chart
        .configure_mesh()
        .x_desc("simulated time (s)")
        .y_desc("segments completed")
        .draw()?;
    let mut points: Vec<(f64, f64)> = vec![(0.0, 0.0)];
    points.extend(thinned(done).map(|(i, &t)| (t as f64 / 1e6, (i + 1) as f64)));
    chart
        .draw_series(LineSeries::new(points, BLUE.stroke_width(2)))?
        .label("segments completed (cumulative)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    let red = RED.mix(0.7);
    chart
        .draw_series(crashes.iter().map(|(t, _)| {
            let x = *t as f64 / 1e6;
            PathElement::new(vec![(x, 0.0), (x, total * 1.05)], red)
        }))?
        .label("node crash")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], red));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// The distribution of submit-to-completion latency per priority class, as CDFs.
fn latencies<'a>(report: &Report, area: &Area<'a>) -> DrawResult<'a> {
    let classes = ["urgent", "high", "normal", "low"];
    let colours = [RED, MAGENTA, BLUE, GREEN];
    let mut by_class: Vec<Vec<u64>> = vec![Vec::new(); classes.len()];
    for t in report.tasks().iter().filter(|t| t.completed) {
        let c = class(t.priority);
        if let Some(i) = classes.iter().position(|&n| n == c) {
            by_class[i].push(t.ended_us.saturating_sub(t.submitted_us));
        }
    }
    for v in &mut by_class {
        v.sort_unstable();
    }
    let all: Vec<u64> = {
        let mut all: Vec<u64> = by_class.iter().flatten().copied().collect();
        all.sort_unstable();
        all
    };
    // Up to the 99.5th percentile, so one straggler does not flatten every curve.
    let x_max = (quantile(&all, 0.995) as f64 / 1000.0).max(1.0);
    let mut chart = ChartBuilder::on(area)
        .caption(
            "task latency by priority (submit to completion)",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max * 1.05, 0f64..1.0)?;
    chart
        .configure_mesh()
        .x_desc("latency (simulated ms)")
        .y_desc("share of tasks at or below")
        .draw()?;
    for ((name, colour), v) in classes.iter().zip(colours).zip(&by_class) {
        if v.is_empty() {
            continue;
        }
        let n = v.len() as f64;
        let points: Vec<(f64, f64)> = thinned(v)
            .map(|(i, &l)| (l as f64 / 1000.0, (i + 1) as f64 / n))
            .collect();
        let p50 = quantile(v, 0.5) as f64 / 1000.0;
        let p99 = quantile(v, 0.99) as f64 / 1000.0;
        chart
            .draw_series(LineSeries::new(points, colour.stroke_width(2)))?
            .label(format!(
                "{name}: {} tasks, p50 {p50:.0} ms, p99 {p99:.0} ms",
                v.len()
            ))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}
