//! `agentmesh policy check|apply`: validates a policy file, or applies it to a running
//! cluster without a restart (the node asked spreads it to every other node).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Subcommand;

use super::client::{runtime, ClientArgs};
use crate::actors::policy::Policy;
use crate::actors::service::{ApplyPolicy, PolicyApplied, POLICY_SERVICE};
use crate::runtime::{Client, RemoteMessage};
use crate::transport::tls::NodeIdentity;

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Check a policy file and print what it says.
    Check {
        /// The policy file (TOML).
        file: PathBuf,
    },
    /// Apply a policy file to the cluster through one node.
    Apply {
        /// The policy file (TOML).
        file: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

/// Policy files larger than this are refused.
const MAX_POLICY_BYTES: u64 = 1024 * 1024;

/// Reads and checks a policy file.
pub fn read(path: &Path) -> anyhow::Result<(String, Policy)> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    if len > MAX_POLICY_BYTES {
        bail!("{} is larger than {MAX_POLICY_BYTES} bytes", path.display());
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let policy = Policy::from_toml(&text).with_context(|| format!("in {}", path.display()))?;
    Ok((text, policy))
}

/// Checks the arguments: failures here are bad input.
pub fn prepare(command: &PolicyCommand) -> anyhow::Result<Option<(String, NodeIdentity)>> {
    match command {
        PolicyCommand::Check { file } => {
            let (_, policy) = read(file)?;
            println!("{}", serde_json::to_string(&policy)?);
            Ok(None)
        }
        PolicyCommand::Apply { file, client, .. } => {
            let (text, _) = read(file)?;
            Ok(Some((text, client.identity("policy")?)))
        }
    }
}

pub fn run(command: PolicyCommand, text: String, identity: NodeIdentity) -> anyhow::Result<()> {
    let PolicyCommand::Apply { client, json, .. } = command else {
        return Ok(());
    };
    let applied: PolicyApplied = runtime()?.block_on(async {
        let mut c = Client::connect(&identity, client.to).await?;
        let answer = c
            .request(
                POLICY_SERVICE,
                <ApplyPolicy as RemoteMessage>::KIND,
                &ApplyPolicy { text },
                Duration::from_secs(10),
            )
            .await;
        c.close().await;
        anyhow::Ok(answer?)
    })?;
    if let Some(error) = applied.error {
        bail!("the node refused the policy: {error}");
    }
    if json {
        println!(
            "{}",
            serde_json::json!({"version": applied.version, "origin": applied.origin, "groups": applied.groups})
        );
    } else {
        println!(
            "policy version {} applied at {} ({} groups with rules); it spreads to every node",
            applied.version, applied.origin, applied.groups
        );
    }
    Ok(())
}
