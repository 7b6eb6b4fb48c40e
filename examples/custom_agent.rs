//! Your own agent in your own binary, with the whole `agentmesh` CLI around it.
//!
//! ```text
//! cargo run --example custom_agent -- node --name a --listen 127.0.0.1:7000
//! cargo run -- submit --to 127.0.0.1:7000 --capability shout --input notes.txt --results
//! ```
//!
//! Every `node` this program runs starts two replicas of `Shout` next to the built-in
//! demo agents, which `--agents` can still ask for.

use agentmesh::builtin::SegmentInput;
use agentmesh::prelude::*;

/// Shouts its segment's text back, a word at a time.
#[derive(Default)]
struct Shout;

impl Agent for Shout {
    // `agentmesh submit` sends each segment a `SegmentInput`; an agent of a program
    // that submits its own tasks can take any serde type.
    type Input = SegmentInput;
    type Output = String;

    fn agent_type(&self) -> &str {
        "shout"
    }

    fn capabilities(&self) -> Vec<Capability> {
        vec![Capability {
            name: "shout".into(),
            version: "1.0".into(),
            tags: vec!["text".into()],
            capacity: 1,
        }]
    }

    async fn work(
        &self,
        input: SegmentInput,
        ctx: &mut SegmentContext,
    ) -> Result<String, AgentError> {
        if input.text.is_empty() {
            return Err(AgentError::new("nothing to shout"));
        }
        let words: Vec<&str> = input.text.split_whitespace().collect();
        let mut out = Vec::with_capacity(words.len());
        for (i, word) in words.iter().enumerate() {
            out.push(word.to_uppercase());
            ctx.progress(((i + 1) * 1000 / words.len()) as u16);
        }
        Ok(out.join(" "))
    }
}

fn main() -> std::process::ExitCode {
    Cli::new().agent::<Shout>(2).run()
}
