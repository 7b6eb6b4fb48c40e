//! Retrieval-augmented analysis as two kinds of agents: `retrieve` finds the sentences
//! of one document chunk that answer a question, `summarize` composes an answer from
//! the passages every retriever found. The demo and `examples/rag.rs` chain them stage
//! to stage; `agentmesh node --agents retrieve=2,summarize=1` runs them too.
//!
//! Scoring is lexical (question terms found in a sentence), so results are exact and
//! checkable; `ms` stands for the model's time on a segment and is spent with progress
//! reports, so a crash midway costs real work.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::actors::{Agent, AgentError, SegmentContext};
use crate::builtin::work_for;
use crate::transport::wire::payload::Capability;

/// The shipped corpus: AgentMesh's own design documents, so the demo's questions have
/// real answers.
pub const CORPUS: &[(&str, &str)] = &[
    ("architecture.md", include_str!("../docs/architecture.md")),
    ("acp.md", include_str!("../docs/acp.md")),
    (
        "runtime-semantics.md",
        include_str!("../docs/runtime-semantics.md"),
    ),
];

/// One retrieval segment: a question and one chunk of a document.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RetrieveInput {
    /// The question.
    pub query: String,
    /// Where the chunk comes from (carried into the passages).
    pub source: String,
    /// The chunk's text.
    pub text: String,
    /// Passages to return at most.
    pub top: u32,
    /// Simulated model time, milliseconds.
    pub ms: u64,
}

/// A sentence that answers part of a question.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Passage {
    /// Where it comes from.
    pub source: String,
    /// The sentence.
    pub text: String,
    /// Question terms it contains.
    pub score: u32,
}

/// One summarization segment: a question and the passages found for it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SummarizeInput {
    /// The question.
    pub query: String,
    /// Passages from every retriever.
    pub passages: Vec<Passage>,
    /// Sentences in the answer at most.
    pub sentences: u32,
    /// Simulated model time, milliseconds.
    pub ms: u64,
}

/// An extractive answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// The answer's sentences, most informative first.
    pub sentences: Vec<String>,
    /// Where they come from.
    pub sources: Vec<String>,
    /// Question terms the answer covers.
    pub covered: Vec<String>,
    /// Question terms it does not.
    pub missing: Vec<String>,
}

const STOP: &[&str] = &[
    "what", "when", "where", "which", "does", "with", "from", "that", "this", "there", "their",
    "have", "into", "they", "them", "then", "than", "each", "only", "also", "about", "happens",
    "work", "works",
];

/// The content words of a text: lower case, four letters or more, not a stop word,
/// a plural `s` taken off.
pub fn terms(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.len() >= 4)
        .map(str::to_lowercase)
        .filter(|w| !STOP.contains(&w.as_str()))
        .map(|w| match w.strip_suffix('s') {
            Some(stem) if stem.len() >= 4 && !stem.ends_with('s') => stem.to_string(),
            _ => w,
        })
        .collect()
}

/// Cuts a document into `n` chunks of whole paragraphs, about the same size each.
pub fn chunks(text: &str, n: usize) -> Vec<String> {
    let paragraphs: Vec<&str> = text
        .split("\n\n")
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    let n = n.clamp(1, paragraphs.len().max(1));
    let per = text.len().div_ceil(n);
    let mut out = vec![String::new()];
    for p in paragraphs {
        let last = out.len() - 1;
        if !out[last].is_empty() && out[last].len() + p.len() > per && out.len() < n {
            out.push(String::new());
        }
        let chunk = out.last_mut().expect("never empty");
        if !chunk.is_empty() {
            chunk.push_str("\n\n");
        }
        chunk.push_str(p);
    }
    out
}

/// Sentences of a chunk, Markdown markup and code left out.
fn sentences(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split("\n\n")
        .filter(|p| !p.trim_start().starts_with("```") && !p.trim_start().starts_with('|'))
        .flat_map(|p| {
            let flat = p
                .lines()
                .map(|l| l.trim().trim_start_matches(['#', '-', '*', '>']).trim())
                .collect::<Vec<_>>()
                .join(" ");
            flat.split_inclusive(". ")
                .map(|s| s.trim().to_string())
                .collect::<Vec<_>>()
        })
        .filter(|s| s.len() >= 30 && s.len() <= 400)
}

/// The sentences of `text` sharing most terms with `query`, at most `top`.
pub fn retrieve(query: &str, source: &str, text: &str, top: usize) -> Vec<Passage> {
    let wanted = terms(query);
    let mut found: Vec<Passage> = sentences(text)
        .filter_map(|s| {
            let score = terms(&s).intersection(&wanted).count() as u32;
            (score > 0).then(|| Passage {
                source: source.to_string(),
                text: s,
                score,
            })
        })
        .collect();
    // Best first; among equals the shorter, then the text, so results are stable.
    found.sort_by(|a, b| {
        b.score
            .cmp(&a.score)
            .then(a.text.len().cmp(&b.text.len()))
            .then(a.text.cmp(&b.text))
    });
    found.truncate(top);
    found
}

/// Picks passages greedily by the question terms each adds, up to `max` sentences.
pub fn summarize(query: &str, passages: &[Passage], max: usize) -> Summary {
    let wanted = terms(query);
    let mut covered: BTreeSet<String> = BTreeSet::new();
    let mut left: Vec<(&Passage, BTreeSet<String>)> = passages
        .iter()
        .map(|p| {
            let t: BTreeSet<String> = terms(&p.text).intersection(&wanted).cloned().collect();
            (p, t)
        })
        .collect();
    let mut summary = Summary::default();
    while summary.sentences.len() < max {
        let best = left
            .iter()
            .enumerate()
            .map(|(i, (p, t))| (i, t.difference(&covered).count(), p))
            .filter(|(_, gain, _)| *gain > 0)
            .max_by(|a, b| {
                a.1.cmp(&b.1)
                    .then(b.2.text.len().cmp(&a.2.text.len()))
                    .then(b.2.text.cmp(&a.2.text))
            })
            .map(|(i, _, _)| i);
        let Some(i) = best else { break };
        let (p, t) = left.swap_remove(i);
        covered.extend(t);
        summary.sentences.push(p.text.clone());
        if !summary.sources.contains(&p.source) {
            summary.sources.push(p.source.clone());
        }
    }
    summary.missing = wanted.difference(&covered).cloned().collect();
    summary.covered = covered.into_iter().collect();
    summary
}

fn capability(name: &str) -> Vec<Capability> {
    vec![Capability {
        name: name.into(),
        version: env!("CARGO_PKG_VERSION").into(),
        tags: vec!["rag".into()],
        capacity: 1,
    }]
}

/// Finds the passages of one chunk that answer a question.
#[derive(Clone, Copy, Debug, Default)]
pub struct Retrieve;

impl Agent for Retrieve {
    type Input = RetrieveInput;
    type Output = Vec<Passage>;

    fn agent_type(&self) -> &str {
        "retrieve"
    }

    fn capabilities(&self) -> Vec<Capability> {
        capability("retrieve")
    }

    async fn work(
        &self,
        input: RetrieveInput,
        ctx: &mut SegmentContext,
    ) -> Result<Vec<Passage>, AgentError> {
        if input.query.trim().is_empty() {
            return Err(AgentError::new("no question to retrieve for"));
        }
        work_for(input.ms, ctx).await?;
        Ok(retrieve(
            &input.query,
            &input.source,
            &input.text,
            input.top.max(1) as usize,
        ))
    }
}

/// Composes an answer from passages.
#[derive(Clone, Copy, Debug, Default)]
pub struct Summarize;

impl Agent for Summarize {
    type Input = SummarizeInput;
    type Output = Summary;

    fn agent_type(&self) -> &str {
        "summarize"
    }

    fn capabilities(&self) -> Vec<Capability> {
        capability("summarize")
    }

    async fn work(
        &self,
        input: SummarizeInput,
        ctx: &mut SegmentContext,
    ) -> Result<Summary, AgentError> {
        work_for(input.ms, ctx).await?;
        Ok(summarize(
            &input.query,
            &input.passages,
            input.sentences.max(1) as usize,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terms_drop_short_and_stop_words_and_plurals() {
        let t = terms("What happens to the segments of a crashed node?");
        assert_eq!(
            t.into_iter().collect::<Vec<_>>(),
            vec!["crashed", "node", "segment"]
        );
    }

    #[test]
    fn chunks_keep_every_paragraph_once() {
        let text = "one a\n\ntwo b\n\nthree c\n\nfour d\n\nfive e";
        let c = chunks(text, 2);
        assert_eq!(c.len(), 2);
        assert_eq!(c.join("\n\n"), text);
        assert_eq!(chunks(text, 50).len(), 5);
    }

    #[test]
    fn retrieval_ranks_by_shared_terms_and_the_summary_covers_them() {
        let text = "The ledger reallocates a segment when its node is down and gone. \
                    Lanes carry frames by priority over QUIC streams today. \
                    A crashed node loses its segments, which the ledger reallocates elsewhere.";
        let q = "How does the ledger reallocate segments of a crashed node?";
        let p = retrieve(q, "doc", text, 5);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].text.starts_with("A crashed node"));
        assert!(p[0].score > p[1].score);
        let s = summarize(q, &p, 3);
        assert_eq!(
            s.sentences.len(),
            1,
            "one sentence covers every term: {s:?}"
        );
        assert!(s.missing.is_empty(), "{s:?}");
        assert_eq!(s.sources, vec!["doc"]);
    }
}
