//! What every command that talks to a running node shares: where it is, and the
//! certificate to talk to it with.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;

use crate::transport::tls::{dev_ca_dir, validate_node_name, NodeIdentity};

#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The node's ACP address (its --listen).
    #[arg(long)]
    pub to: SocketAddr,
    /// Folder with the cluster certificates; the client needs its own certificate,
    /// issued like a node's (`agentmesh certs issue --node NAME`). Without it the
    /// development CA is used, as nodes do.
    #[arg(long)]
    pub certs: Option<PathBuf>,
    /// The certificate name to use with --certs.
    #[arg(long, default_value = "admin")]
    pub name: String,
}

impl ClientArgs {
    /// Checks the arguments and loads the identity: failures here are bad input.
    pub fn identity(&self, role: &str) -> anyhow::Result<NodeIdentity> {
        validate_node_name(&self.name)?;
        Ok(match &self.certs {
            Some(dir) => NodeIdentity::load(dir, &self.name).with_context(|| {
                format!(
                    "loading the certificate of {} from {}",
                    self.name,
                    dir.display()
                )
            })?,
            None => development(&format!("{role}-{}", std::process::id()), None)?.0,
        })
    }
}

/// The development identity for `name`, from the CA in `data_dir`'s `dev-ca` folder,
/// or the per-user one; and that folder. A CA there that cannot be loaded is named.
pub fn development(name: &str, data_dir: Option<&Path>) -> anyhow::Result<(NodeIdentity, PathBuf)> {
    let dev = match data_dir {
        Some(dir) => dir.join("dev-ca"),
        None => dev_ca_dir()?,
    };
    NodeIdentity::development_at(&dev, name).with_context(|| {
        format!(
            "loading the development CA from {} (remove that folder to have a new one \
             made; every node on this machine must then restart)",
            dev.display()
        )
    })
}

/// A runtime for a one-shot command.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}
