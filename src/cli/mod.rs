//! Command-line parsing and dispatch for the `agentmesh` binary.

mod acp;
mod bench;
mod certs;
mod demo;
mod node;
mod status;

use clap::{Parser, Subcommand};

/// AgentMesh: supervised AI agents across machines, talking ACP over QUIC.
#[derive(Debug, Parser)]
#[command(name = "agentmesh", version, about)]
pub struct Args {
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
    /// Walk the draft's task sequence through the ACP codec and print each frame.
    Demo(demo::DemoArgs),
    /// Create the cluster CA and node certificates.
    Certs {
        #[command(subcommand)]
        command: certs::CertsCommand,
    },
    /// Run a node.
    Node(node::NodeArgs),
    /// Show the cluster as a node sees it: members, their state and RTT.
    Status(status::StatusArgs),
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

    /// How much to log: a node reports what it does; one-shot commands only warn.
    pub fn log_level(&self) -> tracing::Level {
        match self.command {
            Command::Node(_) => tracing::Level::INFO,
            _ => tracing::Level::WARN,
        }
    }
}

/// A command that did not succeed: what to print and the exit code.
pub struct Failure {
    /// Printed on one line to stderr.
    pub error: anyhow::Error,
    /// 2 for bad input (arguments, bytes); 1 for anything else.
    pub exit_code: u8,
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

/// Runs the parsed command.
pub fn run(args: Args) -> Result<(), Failure> {
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
            let (name, identity) = node::prepare(&args).map_err(Failure::bad_input)?;
            node::run(args, name, identity).map_err(Failure::failed)
        }
    }
}
