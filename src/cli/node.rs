//! `agentmesh node`: runs a node: the secure ACP transport, cluster membership, and the
//! agent layer (discovery, coordinator, workers, policy) with the agents asked for. It
//! joins through the `--join` addresses, detects failed nodes, and leaves cleanly on
//! SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tracing::{info, warn};

use crate::actors::ledger::LedgerConfig;
use crate::actors::record::Recorder;
use crate::actors::{AgentHost, HostConfig, RestartPolicy};
use crate::runtime::{advertised_addr, MembershipConfig, Node, NodeConfig, NodeError};
use crate::transport::clock::SystemClock;
use crate::transport::tls::{validate_node_name, NodeIdentity};
use crate::transport::{EndpointConfig, TransportError};

#[derive(Debug, Args)]
pub struct NodeArgs {
    /// UDP address to listen on.
    #[arg(long, default_value = "127.0.0.1:7600")]
    listen: SocketAddr,
    /// Address of a node to join (repeatable; may be this node's own).
    #[arg(long)]
    join: Vec<SocketAddr>,
    /// The address other nodes reach this one at. Default: --listen, or, listening on
    /// every address (0.0.0.0), this host's address toward the first --join node (or
    /// its default route) at the --listen port.
    #[arg(long, value_parser = parse_advertise)]
    advertise: Option<SocketAddr>,
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
    /// Agents to run here, as NAME=REPLICAS separated by commas (built in: echo,
    /// sleep, wordcount, crash, retrieve, summarize).
    #[arg(long, value_parser = parse_agents, default_value = "")]
    agents: AgentList,
    /// The coordination group this node's agents join.
    #[arg(long, default_value_t = 0)]
    group: u16,
    /// Access policy per coordination group (TOML); `agentmesh policy apply` replaces
    /// it later without a restart.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Record what this node sees as a workload (JSON Lines) that `agentmesh sim run`
    /// replays.
    #[arg(long)]
    record: Option<PathBuf>,
    /// Restarts of one agent replica allowed within --restart-window after it panics
    /// (after 50 ms, doubling each time); one panic more and it rests for
    /// --restart-rest. While every replica of an agent rests, the agent is unhealthy
    /// and gets no work.
    #[arg(long, default_value_t = RestartPolicy::default().max_restarts as u64,
          value_parser = clap::value_parser!(u64).range(0..=1000))]
    max_restarts: u64,
    /// The window, in seconds, panics are counted in for --max-restarts.
    #[arg(long, value_name = "SECS", default_value_t = RestartPolicy::default().window.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    restart_window: u64,
    /// How long, in seconds, a replica that panicked too often rests before it comes
    /// back.
    #[arg(long, value_name = "SECS", default_value_t = RestartPolicy::default().rest.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    restart_rest: u64,
    /// On SIGINT or SIGTERM, how long in seconds the node drains before it leaves: it
    /// takes no new work, its coordinator allocates nothing more, and the attempts
    /// running here, and those of its tasks elsewhere, run to their end, their results
    /// reaching the standbys that take the tasks over (with no other node up, it runs
    /// its tasks on to their end instead). 0 leaves at once; what is still running when
    /// the time is up runs again elsewhere. A second signal leaves at once.
    #[arg(long, value_name = "SECS", default_value_t = 20,
          value_parser = clap::value_parser!(u64).range(0..=3_600))]
    drain_timeout: u64,
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

fn parse_advertise(text: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = text
        .parse()
        .map_err(|e| format!("{e} (expected IP:PORT)"))?;
    if addr.ip().is_unspecified() || addr.port() == 0 {
        return Err(format!(
            "{addr} is no address to reach a node at: give one IP and a port"
        ));
    }
    Ok(addr)
}

/// The agents asked for with `--agents`, in order: (name, replicas).
#[derive(Clone, Debug, Default)]
pub struct AgentList(pub Vec<(String, usize)>);

/// Replicas of one agent on one node at most.
const MAX_REPLICAS: usize = 10_000;

fn parse_agents(text: &str) -> Result<AgentList, String> {
    let mut list = Vec::new();
    for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (name, n) = item
            .split_once('=')
            .ok_or_else(|| format!("{item:?}: write NAME=REPLICAS, e.g. sleep=4"))?;
        let n: usize = n
            .parse()
            .map_err(|_| format!("{item:?}: replicas must be a number"))?;
        if n == 0 || n > MAX_REPLICAS {
            return Err(format!("{item:?}: replicas must be 1..={MAX_REPLICAS}"));
        }
        if list.iter().any(|(seen, _)| seen == name) {
            return Err(format!("{name:?} is listed twice"));
        }
        list.push((name.to_string(), n));
    }
    Ok(AgentList(list))
}

/// What `prepare` checked and read, for `run`.
pub struct Prepared {
    name: String,
    identity: NodeIdentity,
    policy: Option<String>,
}

/// Checks the arguments, loads the identity and the policy: failures here are bad
/// input.
pub fn prepare(args: &NodeArgs, known: &[&str]) -> anyhow::Result<Prepared> {
    for (agent, _) in &args.agents.0 {
        if !known.contains(&agent.as_str()) {
            anyhow::bail!(
                "--agents: no agent named {agent:?} (known: {})",
                known.join(", ")
            );
        }
    }
    let policy = match &args.policy {
        Some(path) => Some(super::policy::read(path)?.0),
        None => None,
    };
    let (name, identity) = identity(args)?;
    Ok(Prepared {
        name,
        identity,
        policy,
    })
}

fn identity(args: &NodeArgs) -> anyhow::Result<(String, NodeIdentity)> {
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| format!("node-{}", args.listen.port()));
    validate_node_name(&name)?;
    let identity = match &args.certs {
        Some(dir) => NodeIdentity::load(dir, &name)
            .with_context(|| format!("loading the certificate of {name} from {}", dir.display()))?,
        None => {
            let (identity, ca_dir) = super::client::development(&name, args.data_dir.as_deref())?;
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
pub fn run(args: NodeArgs, prepared: Prepared, agents: &super::AgentCatalog) -> anyhow::Result<()> {
    let Prepared {
        name,
        identity,
        policy,
    } = prepared;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let config = NodeConfig {
            transport: EndpointConfig::new(args.listen),
            // Joined below, once its services and agents are up: a node others can see
            // answers for them at once.
            join: Vec::new(),
            membership: MembershipConfig::default(),
            metrics: args.metrics,
            // Worked out from --join here, since the node joins only below.
            advertise: Some(
                args.advertise
                    .unwrap_or_else(|| advertised_addr(args.listen, &args.join)),
            )
            .filter(|addr| addr.port() != 0),
        };
        let mut node = Node::start(config, &identity, Arc::new(SystemClock))
            .await
            .map_err(in_use_hint)?;
        info!(node = %name, addr = %node.me().addr, listen = %args.listen, "listening");
        let (recorder, recording) = match &args.record {
            Some(path) => {
                let (recorder, observations) = Recorder::new();
                let (finish, finished) = tokio::sync::oneshot::channel();
                let task = tokio::spawn(super::record::record(
                    name.clone(),
                    path.clone(),
                    observations,
                    finished,
                ));
                (Some(recorder), Some((finish, task)))
            }
            None => (None, None),
        };
        let host_config = HostConfig {
            group: args.group,
            policy,
            ledger: LedgerConfig::default(),
            recorder,
            policy_respread: None,
            coordinator_tick: None,
            restarts: RestartPolicy {
                max_restarts: usize::try_from(args.max_restarts).unwrap_or(usize::MAX),
                window: Duration::from_secs(args.restart_window),
                rest: Duration::from_secs(args.restart_rest),
                ..RestartPolicy::default()
            },
        };
        let mut host = AgentHost::start(&node, host_config).await?;
        agents.start(&host, &args.agents.0).await?;
        let mut conflict = node.transport().name_conflict();
        node.join(args.join.iter().copied());
        let stopped = tokio::select! {
            _ = shutdown_signal() => None,
            _ = node.stopped() => Some("its cluster actor kept failing".to_string()),
            _ = host.stopped() => Some("an actor of its agent layer failed".to_string()),
            // The cluster will not take it: better stopped, and said so, than retrying.
            Ok(why) = conflict.wait_for(Option::is_some) => why.clone(),
        };
        if let Some(why) = stopped {
            anyhow::bail!("the node stopped: {why}");
        }
        if args.drain_timeout > 0 {
            let within = Duration::from_secs(args.drain_timeout);
            info!(node = %name, within_secs = args.drain_timeout, "draining before leaving (a second SIGINT or SIGTERM leaves at once)");
            let started = tokio::time::Instant::now();
            tokio::select! {
                left = host.drain(within) => match left {
                    Some(left) if left.is_done() => {
                        info!(ms = started.elapsed().as_millis() as u64, "drained")
                    }
                    Some(left) => warn!(
                        attempts_here = left.attempts_here,
                        running = left.coordinator.running,
                        unheld = left.coordinator.unheld,
                        "drain cut short by --drain-timeout: what still ran runs again elsewhere"
                    ),
                    None => warn!("drain cut short by --drain-timeout: the agent layer did not answer"),
                },
                _ = shutdown_signal() => warn!("a second signal: leaving without draining further"),
            }
        }
        info!(node = %name, "leaving");
        host.stop();
        node.leave().await;
        if let Some((finish, task)) = recording {
            let _ = finish.send(());
            let _ = task.await;
        }
        anyhow::Ok(())
    })
}

/// A node's address in use is often its own previous run, still draining: says so.
fn in_use_hint(error: NodeError) -> anyhow::Error {
    let in_use = matches!(
        &error,
        NodeError::Transport(TransportError::Bind { source, .. })
            if source.kind() == std::io::ErrorKind::AddrInUse
    );
    match in_use {
        true => anyhow::anyhow!(
            "{error} (if the other process is this node's previous run, it may still be draining, for up to its --drain-timeout: start this one once that has exited)"
        ),
        false => error.into(),
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
