//! Document analysis split across retriever and summarizer agents, chained stage to
//! stage, on a two-node cluster inside this process (real QUIC and mutual TLS on
//! loopback).
//!
//! ```text
//! cargo run --example rag -- "How does the ledger reallocate a crashed node's segments?"
//! ```
//!
//! Stage 1 cuts each document into chunks and gives every chunk to a `retrieve` agent
//! (one segment each, spread over both nodes); stage 2 hands the best passages to a
//! `summarize` agent. The agents live in `agentmesh::rag`.

use agentmesh::local::{inputs, LocalCluster};
use agentmesh::prelude::*;
use agentmesh::rag::{
    chunks, Passage, Retrieve, RetrieveInput, Summarize, SummarizeInput, Summary, CORPUS,
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let question = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "How does the ledger reallocate a crashed node's segments?".into());

    let cluster = LocalCluster::start(&["left", "right"]).await?;
    for i in 0..cluster.len() {
        cluster.host(i).add(Retrieve, 2).await?;
        cluster.host(i).add(Summarize, 1).await?;
    }
    cluster.wait_for_agents(4).await?;

    // Stage 1: one retrieval segment per chunk of every document.
    let query = question.as_str();
    let pieces: Vec<RetrieveInput> = CORPUS
        .iter()
        .flat_map(|(name, text)| {
            chunks(text, 4)
                .into_iter()
                .enumerate()
                .map(move |(i, text)| RetrieveInput {
                    query: query.into(),
                    source: format!("{name}#{i}"),
                    text,
                    top: 3,
                    ms: 100,
                })
        })
        .collect();
    let (retrieved, found): (_, Vec<Vec<Passage>>) = cluster
        .run(
            0,
            SubmitRequest::new("retrieve", inputs(&pieces)?)
                .with_priority(160)
                .with_label("retrieve"),
        )
        .await?;
    let mut passages: Vec<Passage> = found.into_iter().flatten().collect();
    passages.sort_by_key(|p| std::cmp::Reverse(p.score));
    passages.truncate(10);
    println!(
        "stage 1: {} chunks searched in {} ms, {} passages kept",
        retrieved.segments,
        retrieved.elapsed_ms,
        passages.len()
    );

    // Stage 2: the answer, from the best passages.
    let (summarized, answer): (_, Vec<Summary>) = cluster
        .run(
            1,
            SubmitRequest::new(
                "summarize",
                inputs([SummarizeInput {
                    query: question.clone(),
                    passages,
                    sentences: 3,
                    ms: 100,
                }])?,
            )
            .with_priority(160)
            .with_label("summarize"),
        )
        .await?;
    println!("stage 2: summarized in {} ms\n", summarized.elapsed_ms);

    println!("Q: {question}");
    let answer = answer.into_iter().next().unwrap_or_default();
    for sentence in &answer.sentences {
        println!("A: {sentence}");
    }
    println!(
        "   (from {}; terms not covered: {:?})",
        answer.sources.join(", "),
        answer.missing
    );
    cluster.shutdown().await;
    if answer.sentences.is_empty() {
        anyhow::bail!("no passage answered the question");
    }
    Ok(())
}
