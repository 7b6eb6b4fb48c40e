//! The demo agents built into the `agentmesh` binary, so the CLI exercises the whole
//! mesh with no code of one's own: `echo`, `sleep`, `wordcount` and `crash`. Start them
//! with `agentmesh node --agents sleep=4,echo=2`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::actors::{Agent, AgentError, SegmentContext};
use crate::transport::wire::payload::Capability;

/// The input `agentmesh submit` gives each segment; every built-in agent reads the
/// fields it needs and ignores the rest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SegmentInput {
    /// The segment's index.
    pub segment: u32,
    /// How long `sleep` and `crash` work on it.
    pub ms: u64,
    /// Text for `echo` and `wordcount`.
    pub text: String,
    /// `crash` panics on attempts up to this one (1: the first attempt panics).
    pub panic_attempts: u32,
}

fn capability(name: &str) -> Vec<Capability> {
    vec![Capability {
        name: name.into(),
        version: env!("CARGO_PKG_VERSION").into(),
        tags: vec!["builtin".into()],
        capacity: 1,
    }]
}

/// Works for the segment's `ms` milliseconds, reporting progress and stopping early
/// when cancelled. Used by `sleep` and `crash`.
pub(crate) async fn work_for(ms: u64, ctx: &mut SegmentContext) -> Result<u64, AgentError> {
    const STEP_MS: u64 = 50;
    let mut slept = 0;
    while slept < ms {
        if ctx.is_cancelled() {
            return Err(AgentError::new("cancelled"));
        }
        let step = STEP_MS.min(ms - slept);
        tokio::time::sleep(Duration::from_millis(step)).await;
        slept += step;
        ctx.progress((slept * 1000 / ms.max(1)) as u16);
    }
    Ok(slept)
}

/// Answers with its input's text (or the segment number when there is none).
#[derive(Clone, Copy, Debug, Default)]
pub struct Echo;

impl Agent for Echo {
    type Input = SegmentInput;
    type Output = String;

    fn agent_type(&self) -> &str {
        "echo"
    }

    fn capabilities(&self) -> Vec<Capability> {
        capability("echo")
    }

    async fn work(
        &self,
        input: SegmentInput,
        _: &mut SegmentContext,
    ) -> Result<String, AgentError> {
        Ok(if input.text.is_empty() {
            format!("segment {}", input.segment)
        } else {
            input.text
        })
    }
}

/// Works for the segment's given milliseconds, or for the task's `ms` parameter if
/// `agentmesh adjust` set one before the segment started; answers how long it slept.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sleep;

impl Agent for Sleep {
    type Input = SegmentInput;
    type Output = u64;

    fn agent_type(&self) -> &str {
        "sleep"
    }

    fn capabilities(&self) -> Vec<Capability> {
        capability("sleep")
    }

    async fn work(&self, input: SegmentInput, ctx: &mut SegmentContext) -> Result<u64, AgentError> {
        let adjusted = ctx
            .adjustment()
            .params
            .get("ms")
            .map(|ms| ms.parse::<u64>());
        let ms = match adjusted {
            None => input.ms,
            Some(Ok(ms)) => ms,
            Some(Err(e)) => return Err(AgentError::new(format!("parameter ms: {e}"))),
        };
        work_for(ms, ctx).await
    }
}

/// Counts the words of its text chunk.
#[derive(Clone, Copy, Debug, Default)]
pub struct WordCount;

impl Agent for WordCount {
    type Input = SegmentInput;
    type Output = u64;

    fn agent_type(&self) -> &str {
        "wordcount"
    }

    fn capabilities(&self) -> Vec<Capability> {
        capability("wordcount")
    }

    async fn work(&self, input: SegmentInput, ctx: &mut SegmentContext) -> Result<u64, AgentError> {
        let words = input.text.split_whitespace().count() as u64;
        ctx.progress(1000);
        Ok(words)
    }
}

/// Panics on request (attempts up to `panic_attempts`), otherwise works like `sleep`:
/// for exercising supervision and reallocation.
#[derive(Clone, Copy, Debug, Default)]
pub struct Crash;

impl Agent for Crash {
    type Input = SegmentInput;
    type Output = u64;

    fn agent_type(&self) -> &str {
        "crash"
    }

    fn capabilities(&self) -> Vec<Capability> {
        capability("crash")
    }

    async fn work(&self, input: SegmentInput, ctx: &mut SegmentContext) -> Result<u64, AgentError> {
        if ctx.attempt() <= input.panic_attempts {
            panic!(
                "crash agent: asked to panic on attempt {} of segment {}",
                ctx.attempt(),
                ctx.segment()
            );
        }
        work_for(input.ms, ctx).await
    }
}
