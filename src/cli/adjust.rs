//! `agentmesh adjust`: steers a running task at the node that coordinates it: new
//! parameters or priority for every attempt running (ADJUST, urgent lane), or cancel.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use uuid::Uuid;

use super::client::{runtime, ClientArgs};
use crate::actors::service::{AdjustAnswer, AdjustRequest, ADJUST_SERVICE};
use crate::runtime::{Client, RemoteMessage};
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
    let answer: AdjustAnswer = runtime()?.block_on(async {
        let mut c = Client::connect(&identity, args.client.to).await?;
        let answer = c
            .request(
                ADJUST_SERVICE,
                <AdjustRequest as RemoteMessage>::KIND,
                &request,
                Duration::from_secs(10),
            )
            .await;
        c.close().await;
        anyhow::Ok(answer?)
    })?;
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
