//! `agentmesh node`: runs a node: the secure ACP transport and cluster membership. It
//! joins through the `--join` addresses, detects failed nodes, and leaves cleanly on
//! SIGINT or SIGTERM. Remote actor messaging and agents come on top of it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use tracing::{info, warn};

use agentmesh::runtime::{MembershipConfig, Node, NodeConfig};
use agentmesh::transport::clock::SystemClock;
use agentmesh::transport::tls::{validate_node_name, NodeIdentity};
use agentmesh::transport::EndpointConfig;

#[derive(Debug, Args)]
pub struct NodeArgs {
    /// UDP address to listen on.
    #[arg(long, default_value = "127.0.0.1:7600")]
    listen: SocketAddr,
    /// Address of a node to join (repeatable).
    #[arg(long)]
    join: Vec<SocketAddr>,
    /// This node's name (a-z, 0-9, '-'); default `node-PORT`.
    #[arg(long)]
    name: Option<String>,
    /// Folder with ca.crt, NAME.crt and NAME.key (`agentmesh certs`). Without it the
    /// node uses the development CA (see --data-dir).
    #[arg(long)]
    certs: Option<PathBuf>,
    /// The node's data folder; the development CA is kept in DIR/dev-ca. Default: the
    /// per-user data folder ($XDG_DATA_HOME/agentmesh or ~/.local/share/agentmesh, or
    /// $AGENTMESH_DEV_CA_DIR for the CA itself).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Log lines as human-readable text or as JSON objects.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// How a node writes its log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per event, for machines.
    Json,
}

/// Checks the arguments and loads the identity: failures here are bad input.
pub fn prepare(args: &NodeArgs) -> anyhow::Result<(String, NodeIdentity)> {
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| format!("node-{}", args.listen.port()));
    validate_node_name(&name)?;
    let identity = match &args.certs {
        Some(dir) => NodeIdentity::load(dir, &name)
            .with_context(|| format!("loading the certificate of {name} from {}", dir.display()))?,
        None => {
            let (identity, ca_dir) = match &args.data_dir {
                Some(dir) => NodeIdentity::development_at(&dir.join("dev-ca"), &name)?,
                None => NodeIdentity::development(&name)?,
            };
            warn!(
                ca = %ca_dir.display(),
                "development mode: this node's certificate comes from the per-user development CA; \
                 nodes on this machine join each other, nodes elsewhere need real certificates \
                 (agentmesh certs init / issue, then --certs)"
            );
            identity
        }
    };
    Ok((name, identity))
}

/// Runs the node until SIGINT or SIGTERM, then leaves the cluster cleanly.
pub fn run(args: NodeArgs, name: String, identity: NodeIdentity) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let config = NodeConfig {
            transport: EndpointConfig::new(args.listen),
            join: args.join.clone(),
            membership: MembershipConfig::default(),
            metrics: args.metrics,
        };
        let mut node = Node::start(config, &identity, Arc::new(SystemClock)).await?;
        info!(node = %name, addr = %node.me().addr, "listening");
        let gave_up = tokio::select! {
            _ = shutdown_signal() => false,
            _ = node.stopped() => true,
        };
        if gave_up {
            anyhow::bail!("the node stopped: its cluster actor kept failing");
        }
        info!(node = %name, "leaving");
        node.leave().await;
        anyhow::Ok(())
    })
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
