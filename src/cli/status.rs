//! `agentmesh status --to ADDR`: asks a node for the cluster as it sees it: members,
//! the agents in its registry and the tasks its coordinator runs.

use std::time::Duration;

use anyhow::bail;
use clap::Args;
use serde::Serialize;

use super::client::{runtime, ClientArgs};
use crate::actors::service::{AgentsRequest, AgentsStatus, AGENTS_SERVICE};
use crate::runtime::{status_of, Client, ClientError, MemberInfo, RemoteMessage};
use crate::transport::tls::NodeIdentity;

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
    /// How long to wait for the answer.
    #[arg(long, default_value_t = 5_000)]
    timeout_ms: u64,
}

#[derive(Serialize)]
struct Status {
    node: String,
    members: Vec<MemberInfo>,
    /// `None` when the node runs no agent layer (nothing of it is printed then), or
    /// did not answer for it.
    #[serde(flatten)]
    agents: Option<AgentsStatus>,
    /// Why the node's agents and tasks are not listed, if it runs an agent layer.
    #[serde(skip_serializing_if = "Option::is_none")]
    agents_error: Option<String>,
}

/// Checks the arguments and loads the identity: failures here are bad input.
pub fn prepare(args: &StatusArgs) -> anyhow::Result<NodeIdentity> {
    args.client.identity("status")
}

pub fn run(args: StatusArgs, identity: NodeIdentity) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let to = args.client.to;
        let mut client = Client::connect(&identity, to).await?;
        let report = status_of(&mut client, to, args.timeout_ms).await;
        let report = match report {
            Ok(report) => report,
            Err(e) => {
                client.close().await;
                return Err(e.into());
            }
        };
        let agents = client
            .request::<_, AgentsStatus>(
                AGENTS_SERVICE,
                <AgentsRequest as RemoteMessage>::KIND,
                &AgentsRequest {},
                Duration::from_millis(args.timeout_ms),
            )
            .await;
        client.close().await;
        let (agents, agents_error) = match agents {
            Ok(agents) => (Some(agents), None),
            // A node without an agent layer has no agents, tasks or policy to list
            // (the mesh's answer for a service not registered there).
            Err(ClientError::Refused { reason, .. }) if reason.starts_with("no actor named") => {
                (None, None)
            }
            Err(e) => (None, Some(e.to_string())),
        };
        let status = Status {
            node: report.node,
            members: report.members,
            agents,
            agents_error,
        };
        if args.json {
            println!("{}", serde_json::to_string(&status)?);
        } else {
            print_tables(&status);
        }
        // The members are listed; the rest was asked for and not had.
        if let Some(e) = status.agents_error {
            bail!("the node's agents and tasks could not be listed: {e}");
        }
        anyhow::Ok(())
    })
}

fn print_tables(status: &Status) {
    println!("cluster as seen by {}", status.node);
    match status.agents.as_ref().map(|a| &a.policy) {
        None if status.agents_error.is_some() => println!("(agents and tasks not listed)\n"),
        None => println!("(no agent layer at this node)\n"),
        Some(p) if p.version == 0 && p.groups == 0 => {
            println!("policy: none (every group may send to every group)\n");
        }
        Some(p) if p.version == 0 => {
            println!(
                "policy: its start-up file ({} groups with rules)\n",
                p.groups
            );
        }
        Some(p) => println!(
            "policy: version {} applied at {} ({} groups with rules)\n",
            p.version, p.origin, p.groups
        ),
    }
    print_members(&status.members);
    if let Some(agents) = &status.agents {
        print_agents(agents);
    }
}

fn print_members(members: &[MemberInfo]) {
    println!(
        "{:<20} {:<24} {:<8} {:>10} {:>20}",
        "NAME", "ADDR", "STATE", "RTT (us)", "INCARNATION"
    );
    for m in members {
        let state = serde_json::to_value(m.state)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        let rtt = m.rtt_us.map_or_else(|| "-".to_string(), |r| r.to_string());
        println!(
            "{:<20} {:<24} {:<8} {:>10} {:>20}",
            m.name,
            m.addr.to_string(),
            state,
            rtt,
            m.incarnation
        );
    }
}

fn print_agents(agents: &AgentsStatus) {
    println!(
        "\n{:>10} {:<20} {:<12} {:>6} {:<24} {:>5} {:>9}",
        "AGENT", "NODE", "TYPE", "GROUP", "CAPABILITIES", "LOAD", "HEALTH"
    );
    for a in &agents.agents {
        let caps: Vec<&str> = a.capabilities.iter().map(|c| c.name.as_str()).collect();
        println!(
            "{:>10} {:<20} {:<12} {:>6} {:<24} {:>5} {:>9}",
            a.agent,
            a.node,
            a.agent_type,
            a.group,
            caps.join(","),
            a.load,
            format!("{:?}", a.health).to_lowercase()
        );
    }
    if agents.agents_not_listed > 0 {
        println!(
            "... and {} more agents, not listed: the answer lists as many as one message carries",
            agents.agents_not_listed
        );
    }
    if !agents.tasks.is_empty() {
        println!(
            "\n{:<36} {:<16} {:<12} {:>4} {:>5} {:>9} {:>11} {:>10}",
            "TASK", "LABEL", "CAPABILITY", "PRIO", "GROUP", "DONE", "REALLOCATED", "ELAPSED ms"
        );
        for t in &agents.tasks {
            println!(
                "{:<36} {:<16} {:<12} {:>4} {:>5} {:>9} {:>11} {:>10}",
                t.task.to_string(),
                t.label.as_deref().unwrap_or("-"),
                t.capability,
                t.priority,
                t.group,
                format!("{}/{}", t.completed, t.segments),
                t.reallocated,
                t.elapsed_ms
            );
        }
    }
}
