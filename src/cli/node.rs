//! `agentmesh node`: runs a node. For now that is the secure ACP transport: it binds,
//! dials the `--join` addresses, keeps the connections, and leaves cleanly on SIGINT
//! or SIGTERM. Membership, failure detection and agents come on top of it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tracing::{info, warn};

use agentmesh::transport::tls::{validate_node_name, NodeIdentity};
use agentmesh::transport::wire::AcpErrorCode;
use agentmesh::transport::{EndpointConfig, OwnershipTable, Transport, TransportEvent};

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
    /// node uses the per-user development CA.
    #[arg(long)]
    certs: Option<PathBuf>,
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
            let (identity, ca_dir) = NodeIdentity::development(&name)?;
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

/// Runs the node until SIGINT or SIGTERM.
pub fn run(args: NodeArgs, name: String, identity: NodeIdentity) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let config = EndpointConfig::new(args.listen);
        let (transport, mut events) = Transport::bind(config, &identity, Arc::new(OwnershipTable::new()))?;
        info!(node = %name, addr = %transport.local_addr()?, "listening");
        for addr in args.join.clone() {
            tokio::spawn(join(transport.clone(), addr));
        }
        let stop = shutdown_signal();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                event = events.recv() => match event {
                    Some(TransportEvent::PeerUp { peer, addr }) => info!(%peer, %addr, "peer up"),
                    Some(TransportEvent::PeerDown { peer, reason }) => info!(%peer, %reason, "peer down"),
                    Some(TransportEvent::Received { peer, via, messages }) => {
                        info!(%peer, via = via.name(), count = messages.len(), "received");
                    }
                    None => break,
                },
            }
        }
        info!(node = %name, "leaving");
        transport.shutdown(AcpErrorCode::Leaving, "node leaving").await;
        anyhow::Ok(())
    })
}

/// Dials `addr` until it answers, backing off from 100 ms to 5 s.
async fn join(transport: Transport, addr: SocketAddr) {
    let mut delay = Duration::from_millis(100);
    loop {
        match transport.connect(addr, None).await {
            Ok(peer) => {
                info!(%peer, %addr, "joined");
                return;
            }
            Err(e) => {
                warn!(%addr, error = %e, retry_in_ms = delay.as_millis() as u64, "cannot reach the node to join");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
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
