//! `agentmesh status --to ADDR`: asks a node for the cluster as it sees it.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use agentmesh::runtime::{request_status, StatusReport};
use agentmesh::transport::tls::{validate_node_name, NodeIdentity};

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The node's ACP address (its --listen).
    #[arg(long)]
    to: SocketAddr,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Folder with the cluster certificates; the client needs its own certificate,
    /// issued like a node's (`agentmesh certs issue --node NAME`). Without it the
    /// development CA is used, as nodes do.
    #[arg(long)]
    certs: Option<PathBuf>,
    /// The certificate name to use with --certs.
    #[arg(long, default_value = "admin")]
    name: String,
    /// How long to wait for the answer.
    #[arg(long, default_value_t = 5_000)]
    timeout_ms: u64,
}

/// Checks the arguments and loads the identity: failures here are bad input.
pub fn prepare(args: &StatusArgs) -> anyhow::Result<NodeIdentity> {
    validate_node_name(&args.name)?;
    Ok(match &args.certs {
        Some(dir) => NodeIdentity::load(dir, &args.name).with_context(|| {
            format!(
                "loading the certificate of {} from {}",
                args.name,
                dir.display()
            )
        })?,
        None => NodeIdentity::development(&format!("status-{}", std::process::id()))?.0,
    })
}

pub fn run(args: StatusArgs, identity: NodeIdentity) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(request_status(&identity, args.to, args.timeout_ms))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

fn print_table(report: &StatusReport) {
    println!("cluster as seen by {}\n", report.node);
    println!(
        "{:<20} {:<24} {:<8} {:>10} {:>16}",
        "NAME", "ADDR", "STATE", "RTT (us)", "INCARNATION"
    );
    for m in &report.members {
        let state = serde_json::to_value(m.state)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        let rtt = m.rtt_us.map_or_else(|| "-".to_string(), |r| r.to_string());
        println!(
            "{:<20} {:<24} {:<8} {:>10} {:>16}",
            m.name,
            m.addr.to_string(),
            state,
            rtt,
            m.incarnation
        );
    }
}
