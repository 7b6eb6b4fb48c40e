//! `agentmesh adjust`: steers a running task at the node that coordinates it: new
//! parameters or priority for every attempt running (ADJUST, urgent lane) and those
//! started after, or cancel.
//! Any member finds it: a task runs at the node it was submitted to until that node
//! goes down, and then at the one that took it over.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use tracing::debug;
use uuid::Uuid;

use super::client::{runtime, ClientArgs};
use crate::actors::service::{AdjustAnswer, AdjustRequest, ADJUST_SERVICE};
use crate::runtime::{request_status, Client, ClientError, MemberState, RemoteMessage};
use crate::transport::tls::NodeIdentity;

#[derive(Debug, Args)]
pub struct AdjustArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The task (as `submit` and `status` print it).
    #[arg(long)]
    task: String,
    /// A parameter to set, as NAME=VALUE (repeatable).
    #[arg(long = "param")]
    params: Vec<String>,
    /// A new priority, 0..=255.
    #[arg(long)]
    priority: Option<u8>,
    /// Cancel the task.
    #[arg(long)]
    cancel: bool,
}

/// Checks the arguments: failures here are bad input.
pub fn prepare(args: &AdjustArgs) -> anyhow::Result<(NodeIdentity, AdjustRequest)> {
    let task = Uuid::parse_str(&args.task).with_context(|| format!("--task {:?}", args.task))?;
    let mut params = BTreeMap::new();
    for p in &args.params {
        let (k, v) = p
            .split_once('=')
            .with_context(|| format!("--param {p:?}: write NAME=VALUE"))?;
        params.insert(k.to_string(), v.to_string());
    }
    if params.is_empty() && args.priority.is_none() && !args.cancel {
        bail!("nothing to adjust: give --param, --priority or --cancel");
    }
    let request = AdjustRequest {
        task,
        params,
        priority: args.priority,
        cancel: args.cancel,
    };
    Ok((args.client.identity("adjust")?, request))
}

pub fn run(args: AdjustArgs, identity: NodeIdentity, request: AdjustRequest) -> anyhow::Result<()> {
    let answer = runtime()?.block_on(adjust_where_it_runs(&identity, args.client.to, &request))?;
    if let Some(error) = answer.error {
        bail!("{error}");
    }
    if request.cancel {
        println!(
            "cancelled task {} ({} running attempt(s) told to stop)",
            request.task, answer.sent
        );
    } else {
        println!(
            "adjusted {} running attempt(s) of task {}",
            answer.sent, request.task
        );
    }
    Ok(())
}

/// How long a node has to answer an adjustment, or to list its members.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends `request` to the node at `to`, and if the task does not run there, to each
/// other member that node holds up, until one coordinates it. Its answer, or the
/// first node's with why no member took it.
async fn adjust_where_it_runs(
    identity: &NodeIdentity,
    to: SocketAddr,
    request: &AdjustRequest,
) -> anyhow::Result<AdjustAnswer> {
    let answer = ask(identity, to, request).await?;
    if !answer.unknown {
        return Ok(answer);
    }
    let Ok(report) = request_status(identity, to, ANSWER_TIMEOUT.as_millis() as u64).await else {
        return Ok(answer);
    };
    let others = report
        .members
        .iter()
        .filter(|m| m.state == MemberState::Up && m.name != report.node);
    let (mut asked, mut unreachable) = (0, 0);
    for member in others {
        match ask(identity, member.addr, request).await {
            Ok(answer) if !answer.unknown => return Ok(answer),
            Ok(_) => asked += 1,
            Err(e) => {
                debug!(node = %member.name, error = %e, "could not ask this member");
                unreachable += 1;
            }
        }
    }
    let asked = match (asked, unreachable) {
        (0, 0) => format!("asked {}, the only member up", report.node),
        (n, 0) => format!("asked {} and {n} other member(s)", report.node),
        (n, u) => format!(
            "asked {} and {n} other member(s); {u} could not be asked",
            report.node
        ),
    };
    let error = format!(
        "no member runs task {}: it ended, or never ran ({asked})",
        request.task
    );
    Ok(AdjustAnswer {
        error: Some(error),
        ..answer
    })
}

/// Asks the node at `addr`, as a short-lived client, to adjust.
async fn ask(
    identity: &NodeIdentity,
    addr: SocketAddr,
    request: &AdjustRequest,
) -> Result<AdjustAnswer, ClientError> {
    Client::request_once(
        identity,
        addr,
        ADJUST_SERVICE,
        <AdjustRequest as RemoteMessage>::KIND,
        request,
        ANSWER_TIMEOUT,
    )
    .await
}
