//! Where a latency run's or a sweep's report goes: one JSON line on standard output always;
//! pretty JSON to `--report`; and to `--report-dir` the JSON (`report.json`), a page a person
//! reads (`report.md`) and its plots as SVG: latency percentiles and throughput over time, and
//! for a sweep latency against offered load. Everything is drawn from the JSON report, so the
//! page and the plots never say something the JSON does not.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use anyhow::Context;
use plotters::prelude::*;
use serde_json::Value;

#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// Also write the report (JSON) to this file.
    #[arg(long, env = "LOADTEST_REPORT")]
    report: Option<PathBuf>,
    /// Write report.json, report.md and the plots (*.svg) into this folder (made if missing).
    #[arg(long, env = "LOADTEST_REPORT_DIR")]
    report_dir: Option<PathBuf>,
}

const LATENCY_OVER_TIME: &str = "latency_over_time.svg";
const THROUGHPUT_OVER_TIME: &str = "throughput_over_time.svg";
const LATENCY_VS_LOAD: &str = "latency_vs_load.svg";
/// plotters' GREEN is pure #00FF00, hard to read on white.
const DARK_GREEN: RGBColor = RGBColor(0, 140, 0);

pub fn write(args: &ReportArgs, report: &Value) -> anyhow::Result<()> {
    let pretty = serde_json::to_string_pretty(report)?;
    if let Some(path) = &args.report {
        write_file(path, &pretty)?;
    }
    if let Some(dir) = &args.report_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot make {}", dir.display()))?;
        write_file(&dir.join("report.json"), &pretty)?;
        write_file(&dir.join("report.md"), &markdown(report))?;
        let timeline = report["timeline"].as_array().map_or(&[][..], Vec::as_slice);
        write_file(&dir.join(LATENCY_OVER_TIME), &latency_over_time(timeline)?)?;
        write_file(
            &dir.join(THROUGHPUT_OVER_TIME),
            &throughput_over_time(timeline)?,
        )?;
        if let Some(steps) = report["steps"].as_array() {
            write_file(&dir.join(LATENCY_VS_LOAD), &latency_vs_load(report, steps)?)?;
        }
    }
    println!("{}", serde_json::to_string(report)?);
    Ok(())
}

fn write_file(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// A number of the report with `decimals` digits, or `-` where it has none.
fn number(value: &Value, decimals: usize) -> String {
    value
        .as_f64()
        .map_or_else(|| "-".to_owned(), |v| format!("{v:.decimals$}"))
}

fn markdown(report: &Value) -> String {
    let sweep = report["bench"] == "sweep";
    let workload = if sweep { &report["workload"] } else { report };
    let mut page = String::new();
    let _ = writeln!(
        page,
        "# loadtest {}\n",
        report["bench"].as_str().unwrap_or("report")
    );
    let mode = match workload["mode"].as_str() {
        Some("async") => format!(
            "async (`submit`, then the stored result read every {} ms)",
            number(&workload["poll_interval_ms"], 1)
        ),
        _ => "sync (`infer`)".to_owned(),
    };
    let texts_from = match workload["texts_from"]["corpus"].as_str() {
        Some(corpus) => format!("drawn from `{corpus}`"),
        None => format!(
            "of `{}` words",
            workload["texts_from"]["words_per_text"]
                .as_str()
                .unwrap_or("?")
        ),
    };
    let _ = writeln!(
        page,
        "{} loop, {mode}; texts per job `{}`, texts {texts_from}.\n",
        report["loop"].as_str().unwrap_or("?"),
        workload["texts_per_job"].as_str().unwrap_or("?"),
    );
    if sweep {
        sweep_markdown(report, &mut page);
    } else {
        let load = match report["rate"].as_f64() {
            Some(rate) => format!(
                "{rate} requests/s ({} arrivals)",
                report["arrivals"].as_str().unwrap_or("?")
            ),
            None => format!("{} requests in flight", number(&report["in_flight"], 0)),
        };
        let _ = writeln!(
            page,
            "Load: {load} for {} s.\n",
            number(&report["duration_s"], 1)
        );
        let _ = writeln!(
            page,
            "| requests | ok | not sent | ok/s | texts/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms |\n\
             | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
        );
        let latency = &report["latency_ms"];
        let _ = writeln!(
            page,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            number(&report["requests"], 0),
            number(&report["ok"], 0),
            number(&report["not_sent"], 0),
            number(&report["ok_per_s"], 1),
            number(&report["texts_per_s"], 1),
            number(&latency["p50"], 1),
            number(&latency["p90"], 1),
            number(&latency["p99"], 1),
            number(&latency["p99_9"], 1),
            number(&latency["max"], 1),
        );
        let errors = report["errors"]
            .as_object()
            .filter(|errors| !errors.is_empty())
            .map_or_else(
                || "none".to_owned(),
                |errors| {
                    errors
                        .iter()
                        .map(|(code, count)| format!("`{code}` {count}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            );
        let _ = writeln!(page, "Errors by code: {errors}.\n");
        if let Some(accepted) = report["accepted_ms"].as_object() {
            let _ = writeln!(
                page,
                "Accepted by the dispatcher (from when due): p50 {} ms, p99 {} ms.\n",
                number(&accepted["p50"], 1),
                number(&accepted["p99"], 1)
            );
        }
        if let Some(cpu) = report["cpu_us_per_text"].as_object() {
            let per_process: Vec<String> = cpu
                .iter()
                .map(|(name, us)| format!("{name} {} µs", number(us, 0)))
                .collect();
            let _ = writeln!(page, "CPU per text: {}.\n", per_process.join(", "));
        }
    }
    let _ = writeln!(
        page,
        "![Latency percentiles over time]({LATENCY_OVER_TIME})\n\n\
         ![Throughput over time]({THROUGHPUT_OVER_TIME})"
    );
    page
}

fn sweep_markdown(report: &Value, page: &mut String) {
    let unit = report["offered_unit"].as_str().unwrap_or("");
    let bounds = &report["bounds"];
    let _ = writeln!(
        page,
        "Steps of {} s; bounds: p99 at most {} ms, error ratio at most {}, throughput following \
         the load to at least {}.\n",
        number(&report["step_duration_s"], 1),
        number(&bounds["max_p99_ms"], 1),
        number(&bounds["max_error_ratio"], 4),
        number(&bounds["min_follow"], 2),
    );
    let knee = &report["knee"];
    if knee.is_null() {
        let _ = writeln!(page, "**No step met the bounds: no knee.**\n");
    } else {
        let _ = writeln!(
            page,
            "**Knee: {} {unit}** ({} answers/s, {} texts/s, p50 {} ms, p99 {} ms).\n",
            number(&knee["offered"], 1),
            number(&knee["ok_per_s"], 1),
            number(&knee["texts_per_s"], 1),
            number(&knee["latency_ms"]["p50"], 1),
            number(&knee["latency_ms"]["p99"], 1),
        );
    }
    let _ = writeln!(
        page,
        "Stopped: {}.\n",
        report["stop_reason"].as_str().unwrap_or("?")
    );
    let _ = writeln!(
        page,
        "| step | offered ({unit}) | ok/s | texts/s | p50 ms | p99 ms | error ratio | not sent | within bounds |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for step in report["steps"].as_array().map_or(&[][..], Vec::as_slice) {
        let _ = writeln!(
            page,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            number(&step["step"], 0),
            number(&step["offered"], 1),
            number(&step["ok_per_s"], 1),
            number(&step["texts_per_s"], 1),
            number(&step["latency_ms"]["p50"], 1),
            number(&step["latency_ms"]["p99"], 1),
            number(&step["error_ratio"], 4),
            number(&step["not_sent"], 0),
            if step["meets_bounds"] == true {
                "yes"
            } else {
                "no"
            },
        );
    }
    let _ = writeln!(
        page,
        "\n![Latency against offered load]({LATENCY_VS_LOAD})\n"
    );
}

/// One line of a plot.
struct Series<'a> {
    name: &'a str,
    color: RGBColor,
    points: Vec<(f64, f64)>,
}

/// `(x, y)` of every timeline entry whose `field` (a path of keys) is a number.
fn timeline_points(timeline: &[Value], field: &[&str]) -> Vec<(f64, f64)> {
    timeline
        .iter()
        .filter_map(|entry| {
            let y = field
                .iter()
                .fold(entry, |value, key| &value[*key])
                .as_f64()?;
            Some((entry["second"].as_f64()?, y))
        })
        .collect()
}

fn latency_over_time(timeline: &[Value]) -> anyhow::Result<String> {
    let series = [("p50", BLUE), ("p90", DARK_GREEN), ("p99", RED)].map(|(name, color)| Series {
        name,
        color,
        points: timeline_points(timeline, &["latency_ms", name]),
    });
    line_chart(
        "Latency percentiles over time (by when requests were due)",
        "second of the run",
        "latency (ms)",
        &series,
        None,
        false,
    )
}

fn throughput_over_time(timeline: &[Value]) -> anyhow::Result<String> {
    let series = [
        Series {
            name: "sent/s",
            color: BLUE,
            points: timeline_points(timeline, &["sent"]),
        },
        Series {
            name: "answered ok/s",
            color: DARK_GREEN,
            points: timeline_points(timeline, &["completed_ok"]),
        },
    ];
    line_chart(
        "Throughput over time",
        "second of the run",
        "requests per second",
        &series,
        None,
        false,
    )
}

fn latency_vs_load(report: &Value, steps: &[Value]) -> anyhow::Result<String> {
    let points = |percentile: &str| -> Vec<(f64, f64)> {
        steps
            .iter()
            .filter_map(|step| {
                Some((
                    step["offered"].as_f64()?,
                    step["latency_ms"][percentile].as_f64()?,
                ))
            })
            .collect()
    };
    let series = [
        Series {
            name: "p50",
            color: BLUE,
            points: points("p50"),
        },
        Series {
            name: "p99",
            color: RED,
            points: points("p99"),
        },
    ];
    let unit = report["offered_unit"].as_str().unwrap_or("offered load");
    line_chart(
        "Latency against offered load",
        &format!("offered load ({unit})"),
        "latency (ms)",
        &series,
        report["bounds"]["max_p99_ms"]
            .as_f64()
            .map(|bound| ("p99 bound", bound)),
        true,
    )
}

/// An SVG line chart of `series` from 0 up on the y axis, with an optional horizontal line
/// (a bound) and optional markers on each point.
fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series<'_>],
    bound: Option<(&str, f64)>,
    markers: bool,
) -> anyhow::Result<String> {
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let (x_min, x_max) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(low, high), x| {
        (low.min(x), high.max(x))
    });
    let (x_min, x_max) = if x_min.is_finite() && x_max > x_min {
        (x_min, x_max)
    } else if x_min.is_finite() {
        (x_min - 1.0, x_min + 1.0)
    } else {
        (0.0, 1.0)
    };
    let y_max = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .chain(bound.map(|(_, value)| value))
        .fold(0.0f64, f64::max);
    let y_max = if y_max > 0.0 { y_max * 1.1 } else { 1.0 };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 450)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(65)
            .build_cartesian_2d(x_min..x_max, 0.0..y_max)?;
        chart
            .configure_mesh()
            // One minor line between labels: the plots stay readable and a few KB.
            .max_light_lines(1)
            .x_desc(x_label)
            .y_desc(y_label)
            .draw()?;
        for line in series {
            let style = line.color.stroke_width(2);
            chart
                .draw_series(LineSeries::new(line.points.iter().copied(), style))?
                .label(line.name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            if markers {
                chart.draw_series(
                    line.points
                        .iter()
                        .map(|&point| Circle::new(point, 3, line.color.filled())),
                )?;
            }
        }
        if let Some((name, value)) = bound {
            let style = BLACK.mix(0.5).stroke_width(1);
            chart
                .draw_series(LineSeries::new([(x_min, value), (x_max, value)], style))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
    }
    Ok(svg)
}
