//! `agentmesh sim run|gen`: replays a recorded or generated workload on the simulator
//! and prints what happened; generates the shipped workloads.

use std::io::{BufReader, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::sims::generate::{generate, KINDS};
use crate::sims::{FaultSpec, Report, Sim, SimConfig, Workload};

#[derive(Debug, Subcommand)]
pub enum SimCommand {
    /// Replay a workload deterministically and print its figures.
    Run(SimRunArgs),
    /// Write one of the shipped workloads (smoke, rag, chaos, scale).
    Gen {
        /// Which one.
        kind: String,
        /// Where to write it (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct SimRunArgs {
    /// The workload (JSON Lines, see sims/README.md).
    file: PathBuf,
    /// Seeds every random choice: the same workload and seed give the same run.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Random faults on top of the workload's, e.g. crash=0.01,partition=0.005,panic=0.05,loss=2%.
    #[arg(long, default_value = "")]
    faults: FaultSpec,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Write the event log (one line per event) to this file.
    #[arg(long)]
    log: Option<PathBuf>,
    /// Draw segment completions over time (with crash markers) and latency by
    /// priority into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    report: Option<PathBuf>,
}

/// What went wrong: bad input (exit 2) or a violated invariant (exit 1).
pub enum SimFailure {
    /// The workload or the arguments.
    BadInput(anyhow::Error),
    /// The run stopped at a violated invariant, or its output could not be written.
    Failed(anyhow::Error),
}

pub fn run(command: SimCommand) -> Result<(), SimFailure> {
    match command {
        SimCommand::Gen { kind, out } => {
            let workload = generate(&kind).ok_or_else(|| {
                SimFailure::BadInput(anyhow::anyhow!(
                    "no workload kind {kind:?} (one of {})",
                    KINDS.join(", ")
                ))
            })?;
            let written = match out {
                Some(path) => std::fs::File::create(&path)
                    .and_then(|f| workload.write(std::io::BufWriter::new(f)))
                    .with_context(|| format!("cannot write {}", path.display())),
                None => workload
                    .write(std::io::stdout().lock())
                    .context("cannot write the workload"),
            };
            written.map_err(SimFailure::Failed)
        }
        SimCommand::Run(args) => {
            let file = std::fs::File::open(&args.file)
                .with_context(|| format!("cannot open {}", args.file.display()))
                .map_err(SimFailure::BadInput)?;
            let workload = Workload::read(BufReader::new(file))
                .with_context(|| format!("{} is not a valid workload", args.file.display()))
                .map_err(SimFailure::BadInput)?;
            let config = SimConfig {
                seed: args.seed,
                faults: args.faults,
                keep_log: args.log.is_some(),
                ..SimConfig::default()
            };
            if let Some(path) = &args.report {
                if path.extension().and_then(|e| e.to_str()) != Some("svg") {
                    return Err(SimFailure::BadInput(anyhow::anyhow!(
                        "--report {} must name an .svg file",
                        path.display()
                    )));
                }
            }
            let horizon_ms = workload.duration_ms().max(1);
            let sim = Sim::new(workload, config);
            let bar = progress_bar(horizon_ms);
            let outcome = sim.run(|t_ms, events| {
                if let Some(bar) = &bar {
                    bar.set_position(t_ms.min(horizon_ms));
                    bar.set_message(format!("{events} events"));
                }
            });
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            match outcome {
                Ok((report, log)) => {
                    write_log(&args, &log).map_err(SimFailure::Failed)?;
                    draw(&args, &report).map_err(SimFailure::Failed)?;
                    print(&report, args.json).map_err(SimFailure::Failed)
                }
                Err(stopped) => {
                    write_log(&args, &stopped.log).map_err(SimFailure::Failed)?;
                    draw(&args, &stopped.report).map_err(SimFailure::Failed)?;
                    print(&stopped.report, args.json).map_err(SimFailure::Failed)?;
                    Err(SimFailure::Failed(anyhow::anyhow!("{stopped}")))
                }
            }
        }
    }
}

/// A progress bar over the workload's simulated time, on standard error, only when it is
/// a terminal (never in pipes, files or CI logs).
fn progress_bar(horizon_ms: u64) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(horizon_ms);
    let style = indicatif::ProgressStyle::with_template(
        "  {bar:40} simulated {pos}/{len} ms  {msg}  ({elapsed})",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    Some(bar)
}

fn draw(args: &SimRunArgs, report: &Report) -> anyhow::Result<()> {
    let Some(path) = &args.report else {
        return Ok(());
    };
    crate::sims::draw_svg(report, path)?;
    if !args.json {
        eprintln!("report drawn in {}", path.display());
    }
    Ok(())
}

fn write_log(args: &SimRunArgs, log: &[String]) -> anyhow::Result<()> {
    let Some(path) = &args.log else {
        return Ok(());
    };
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("cannot write {}", path.display()))?,
    );
    for line in log {
        writeln!(out, "{line}")?;
    }
    out.flush()?;
    Ok(())
}

fn print(r: &Report, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(r)?);
        return Ok(());
    }
    println!("workload {} (seed {})", r.workload, r.seed);
    println!();
    let rows: Vec<(&str, String)> = vec![
        ("agents registered", r.agents_registered.to_string()),
        ("tasks submitted", r.tasks_submitted.to_string()),
        ("tasks completed", r.tasks_completed.to_string()),
        ("tasks failed", r.tasks_failed.to_string()),
        (
            "tasks lost with their coordinator (no standby simulated)",
            r.tasks_lost_with_coordinator.to_string(),
        ),
        ("segments submitted", r.segments_submitted.to_string()),
        ("segments lost", r.lost.to_string()),
        ("duplicates accepted", r.duplicates_accepted.to_string()),
        ("duplicates discarded", r.duplicates_discarded.to_string()),
        ("reallocations", r.reallocated.to_string()),
        (
            "node crashes / partitions / panics",
            format!("{} / {} / {}", r.crashes, r.partitions, r.panics),
        ),
        (
            "replicas rested / allocations refused",
            format!("{} / {}", r.replica_rests, r.allocations_refused),
        ),
        (
            "crash to reallocation p50 / p99 (ms)",
            format!(
                "{:.1} / {:.1}  ({} segments)",
                r.crash_to_realloc_p50_ms, r.crash_to_realloc_p99_ms, r.crash_reallocations
            ),
        ),
        (
            "crash to next attempt p50 / p99 (ms)",
            format!(
                "{:.1} / {:.1}",
                r.crash_to_attempt_p50_ms, r.crash_to_attempt_p99_ms
            ),
        ),
        ("makespan (simulated ms)", format!("{:.1}", r.makespan_ms)),
        ("simulated time (ms)", format!("{:.1}", r.simulated_ms)),
        ("events", r.events.to_string()),
        (
            "events per second (wall)",
            format!("{:.0}", r.events_per_sec),
        ),
        ("wall time (ms)", format!("{:.0}", r.wall_ms)),
        ("peak memory (MiB)", format!("{:.1}", r.peak_memory_mib)),
        ("digest", r.digest.clone()),
    ];
    for (k, v) in rows {
        println!("{k:<40} {v}");
    }
    if !r.latency_by_priority.is_empty() {
        println!();
        println!(
            "{:<10} {:>8} {:>12} {:>12}",
            "priority", "tasks", "p50 (ms)", "p99 (ms)"
        );
        for (class, l) in &r.latency_by_priority {
            println!(
                "{class:<10} {:>8} {:>12.1} {:>12.1}",
                l.tasks, l.p50_ms, l.p99_ms
            );
        }
    }
    if !r.failure_reasons.is_empty() {
        println!();
        for (why, n) in &r.failure_reasons {
            println!("failed x{n}: {why}");
        }
    }
    Ok(())
}
