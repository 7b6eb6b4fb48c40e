//! `agentmesh certs init|issue`: the cluster CA and node certificates on disk.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;

use crate::transport::tls::{validate_node_name, ClusterCa};

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create a cluster CA: DIR/ca.crt and DIR/ca.key (mode 0600).
    Init {
        /// Folder to write into (created if missing).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a node certificate from the CA in DIR: DIR/NAME.crt and DIR/NAME.key (0600).
    Issue {
        /// Folder holding ca.crt and ca.key.
        #[arg(long)]
        dir: PathBuf,
        /// The node's name (a-z, 0-9, '-'), carried in the certificate.
        #[arg(long)]
        node: String,
    },
}

/// Runs the command; errors are the user's to fix (exit code 2).
pub fn run(command: CertsCommand) -> anyhow::Result<()> {
    match command {
        CertsCommand::Init { dir } => {
            let ca = ClusterCa::generate()?;
            ca.save(&dir)?;
            println!(
                "created the cluster CA: {0}/ca.crt and {0}/ca.key",
                dir.display()
            );
            println!("keep ca.key private; issue node certificates with: agentmesh certs issue --dir {} --node NAME", dir.display());
        }
        CertsCommand::Issue { dir, node } => {
            validate_node_name(&node)?;
            let ca = ClusterCa::load(&dir)
                .context("loading the cluster CA (run `agentmesh certs init` first)")?;
            ca.issue_to(&dir, &node)?;
            println!("issued {0}/{node}.crt and {0}/{node}.key", dir.display());
            println!(
                "start the node with: agentmesh node --certs {} --name {node} --listen ADDR",
                dir.display()
            );
        }
    }
    Ok(())
}
