//! The `agentmesh` command line, as a library: the `agentmesh` binary is
//! `Cli::new().run()`, and a program with agents of its own gets the same commands
//! (node, status, submit, policy …) with `Cli::new().agent::<MyAgent>(replicas).run()`.

mod acp;
mod adjust;
mod bench;
mod certs;
mod client;
mod demo;
mod failover;
mod node;
mod policy;
mod procs;
mod record;
mod scale;
mod sim;
mod status;
mod submit;
mod tasks;
mod walkthrough;

use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

use crate::actors::{Agent, AgentHost, HostError};
use crate::builtin;

/// AgentMesh: supervised AI agents across machines, talking ACP over QUIC.
#[derive(Debug, Parser)]
#[command(name = "agentmesh", version, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Read and write ACP frames (for captures and logs).
    Acp {
        #[command(subcommand)]
        command: acp::AcpCommand,
    },
    /// A local three-node cluster runs a RAG workload; one node is killed midway.
    Demo(demo::DemoArgs),
    /// Create the cluster CA and node certificates.
    Certs {
        #[command(subcommand)]
        command: certs::CertsCommand,
    },
    /// Run a node.
    Node(node::NodeArgs),
    /// Show the cluster as a node sees it: members, agents and running tasks.
    Status(status::StatusArgs),
    /// Submit a task to a node's coordinator and wait for its end.
    Submit(submit::SubmitArgs),
    /// Steer a running task: set parameters or priority, or cancel it.
    Adjust(adjust::AdjustArgs),
    /// Check a policy file, or apply it to a running cluster.
    Policy {
        #[command(subcommand)]
        command: policy::PolicyCommand,
    },
    /// Replay workloads deterministically on virtual time.
    Sim {
        #[command(subcommand)]
        command: sim::SimCommand,
    },
    /// Measure AgentMesh against bare libraries, with ratios.
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
}

impl Args {
    /// True if logs should be JSON objects (`node --log-format json`).
    pub fn log_json(&self) -> bool {
        matches!(&self.command, Command::Node(args) if args.log_format == node::LogFormat::Json)
    }

    /// What to log: `rust_log` (the `RUST_LOG` variable) if set, read as a default
    /// level and per-target levels (`debug`, or `info,agentmesh_transport=debug`);
    /// otherwise a node reports what it does and one-shot commands only warn.
    pub fn log_filter(
        &self,
        rust_log: Option<&str>,
    ) -> Result<Targets, tracing_subscriber::filter::ParseError> {
        match rust_log.map(str::trim) {
            Some(spec) if !spec.is_empty() => spec.parse(),
            _ => Ok(Targets::new().with_default(match self.command {
                Command::Node(_) => tracing::Level::INFO,
                _ => tracing::Level::WARN,
            })),
        }
    }
}

/// A command that did not succeed: what to print and the exit code.
struct Failure {
    /// Printed on one line to stderr.
    error: anyhow::Error,
    /// 2 for bad input (arguments, bytes); 1 for anything else.
    exit_code: u8,
}

impl Failure {
    fn bad_input(error: anyhow::Error) -> Failure {
        Failure {
            error,
            exit_code: 2,
        }
    }

    fn failed(error: anyhow::Error) -> Failure {
        Failure {
            error,
            exit_code: 1,
        }
    }
}

type StartAgent = Box<
    dyn for<'a> Fn(
            &'a AgentHost,
            usize,
        ) -> Pin<Box<dyn Future<Output = Result<u32, HostError>> + Send + 'a>>
        + Send
        + Sync,
>;

/// The agents a node can start: by name (`--agents NAME=N`), and those it always
/// starts.
pub struct AgentCatalog {
    known: Vec<(String, StartAgent)>,
    always: Vec<(String, usize)>,
}

impl AgentCatalog {
    fn add<A: Agent + Default>(&mut self) -> String {
        let name = A::default().agent_type().to_string();
        let start: StartAgent =
            Box::new(|host, replicas| Box::pin(host.add(A::default(), replicas)));
        self.known.retain(|(n, _)| *n != name);
        self.known.push((name.clone(), start));
        name
    }

    fn names(&self) -> Vec<&str> {
        self.known.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// Starts the agents asked for plus those always started.
    async fn start(&self, host: &AgentHost, asked: &[(String, usize)]) -> anyhow::Result<()> {
        for (name, replicas) in self.always.iter().chain(asked) {
            let Some((_, start)) = self.known.iter().find(|(n, _)| n == name) else {
                anyhow::bail!("no agent named {name:?}");
            };
            let id = start(host, *replicas).await?;
            tracing::info!(agent = id, %name, replicas, "agent started");
        }
        Ok(())
    }
}

/// The `agentmesh` command line, with the agents a node can run.
pub struct Cli {
    agents: AgentCatalog,
}

impl Default for Cli {
    fn default() -> Self {
        Cli::new()
    }
}

impl Cli {
    /// The command line with the built-in demo agents (`echo`, `sleep`, `wordcount`,
    /// `crash`, `retrieve`, `summarize`), started with `node --agents NAME=N`.
    pub fn new() -> Cli {
        let mut agents = AgentCatalog {
            known: Vec::new(),
            always: Vec::new(),
        };
        agents.add::<builtin::Echo>();
        agents.add::<builtin::Sleep>();
        agents.add::<builtin::WordCount>();
        agents.add::<builtin::Crash>();
        agents.add::<crate::rag::Retrieve>();
        agents.add::<crate::rag::Summarize>();
        Cli { agents }
    }

    /// Every `node` this program runs starts `replicas` replicas of `A` (it can also be
    /// asked for by its agent type with `--agents`).
    pub fn agent<A: Agent + Default>(mut self, replicas: usize) -> Cli {
        let name = self.agents.add::<A>();
        self.agents.always.push((name, replicas.max(1)));
        self
    }

    /// Parses the process's arguments, runs the command, and returns the exit code:
    /// 0 on success, 2 for bad input, 1 for any other failure (one line on stderr).
    pub fn run(self) -> ExitCode {
        quiet_on_closed_stdout();
        let args = Args::parse();
        let filter = match args.log_filter(std::env::var("RUST_LOG").ok().as_deref()) {
            Ok(filter) => filter,
            Err(e) => {
                eprintln!("agentmesh: RUST_LOG is not a log filter (LEVEL or LEVEL,TARGET=LEVEL,...): {e}");
                return ExitCode::from(2);
            }
        };
        let logs = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_target(false);
        let logs = if args.log_json() {
            logs.json().boxed()
        } else {
            logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .boxed()
        };
        tracing_subscriber::registry()
            .with(logs.with_filter(filter))
            .init();
        if matches!(args.command, Command::Node(_)) {
            panics_to_log();
        }
        match run(args, &self.agents) {
            Ok(()) => ExitCode::SUCCESS,
            // A reader that went away is not this command's failure (see above).
            Err(failure) if is_closed_pipe(&failure.error) => ExitCode::from(141),
            Err(failure) => {
                eprintln!("agentmesh: {}", one_line(&failure.error));
                ExitCode::from(failure.exit_code)
            }
        }
    }
}

/// Output piped into a program that stops reading (`agentmesh status | head -3`) ends
/// this one quietly with status 141, as SIGPIPE ends a C program: Rust ignores SIGPIPE,
/// so `println!` panics on the closed pipe instead, with a backtrace.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = panic_message(info);
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

/// What a panic says, if it says it in a string (empty otherwise).
fn panic_message<'a>(info: &'a std::panic::PanicHookInfo<'_>) -> &'a str {
    let payload = info.payload();
    payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or_default()
}

/// A node's panics (an agent's, most often: its replica is restarted and its segment
/// reallocated) go to the log as ERROR events, in the log's format, instead of raw
/// lines on stderr that a reader of `--log-format json` could not parse. A backtrace
/// comes with them when `RUST_BACKTRACE` asks for one.
fn panics_to_log() {
    let before = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = panic_message(info);
        if message.starts_with("failed printing to stdout") {
            return before(info);
        }
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let thread = std::thread::current();
        let thread = thread.name().unwrap_or("unnamed");
        let backtrace = std::backtrace::Backtrace::capture();
        if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
            tracing::error!(panic = message, %location, thread, %backtrace, "a thread panicked");
        } else {
            tracing::error!(panic = message, %location, thread, "a thread panicked");
        }
    }));
}

fn is_closed_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The error and its causes on one line, leaving out a cause whose text the message
/// before it already contains (our errors often say their cause themselves).
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

/// Runs the parsed command.
fn run(args: Args, agents: &AgentCatalog) -> Result<(), Failure> {
    match args.command {
        Command::Acp { command } => acp::run(command).map_err(Failure::bad_input),
        Command::Demo(demo) => demo::run(demo).map_err(Failure::failed),
        Command::Bench { command } => bench::run(command).map_err(Failure::failed),
        Command::Certs { command } => certs::run(command).map_err(Failure::bad_input),
        Command::Status(args) => {
            let identity = status::prepare(&args).map_err(Failure::bad_input)?;
            status::run(args, identity).map_err(Failure::failed)
        }
        Command::Node(args) => {
            let prepared = node::prepare(&args, &agents.names()).map_err(Failure::bad_input)?;
            node::run(args, prepared, agents).map_err(Failure::failed)
        }
        Command::Adjust(args) => {
            let (identity, request) = adjust::prepare(&args).map_err(Failure::bad_input)?;
            adjust::run(args, identity, request).map_err(Failure::failed)
        }
        Command::Submit(args) => {
            let (identity, inputs) = submit::prepare(&args).map_err(Failure::bad_input)?;
            submit::run(args, identity, inputs).map_err(Failure::failed)
        }
        Command::Sim { command } => sim::run(command).map_err(|f| match f {
            sim::SimFailure::BadInput(e) => Failure::bad_input(e),
            sim::SimFailure::Failed(e) => Failure::failed(e),
        }),
        Command::Policy { command } => match policy::prepare(&command)
            .map_err(Failure::bad_input)?
        {
            None => Ok(()),
            Some((text, identity)) => policy::run(command, text, identity).map_err(Failure::failed),
        },
    }
}
