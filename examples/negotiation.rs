//! Supply-chain agents negotiating a contract: three suppliers on three nodes bid
//! against each other through SYNC (worker to worker, never through the coordinator),
//! and the buyer steers them with ADJUST: a lower budget ceiling midway, then the close.
//!
//! ```text
//! cargo run --example negotiation
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use agentmesh::actors::service::AdjustRequest;
use agentmesh::local::{inputs, results, LocalCluster};
use agentmesh::prelude::*;
use serde::{Deserialize, Serialize};

/// What a supplier brings to the table (one segment each).
#[derive(Serialize, Deserialize)]
struct Terms {
    supplier: String,
    /// Opening price, in cents per unit.
    opening: u64,
    /// Below this it loses money and will not go.
    floor: u64,
}

/// A supplier's last word.
#[derive(Debug, Serialize, Deserialize)]
struct Offer {
    supplier: String,
    price: u64,
    rounds: u32,
    withdrew: bool,
}

/// A bid as other suppliers see it in a SYNC.
#[derive(Serialize, Deserialize)]
struct Bid {
    supplier: String,
    price: u64,
}

/// Bidding rounds at most, whatever the buyer does.
const MAX_ROUNDS: u32 = 400;

#[derive(Default)]
struct Supplier;

impl Agent for Supplier {
    type Input = Terms;
    type Output = Offer;

    fn agent_type(&self) -> &str {
        "supplier"
    }

    fn capabilities(&self) -> Vec<Capability> {
        vec![Capability {
            name: "bid".into(),
            version: "1".into(),
            tags: vec!["steel".into()],
            capacity: 1,
        }]
    }

    async fn work(&self, terms: Terms, ctx: &mut SegmentContext) -> Result<Offer, AgentError> {
        let mut offer = Offer {
            supplier: terms.supplier.clone(),
            price: terms.opening,
            rounds: 0,
            withdrew: false,
        };
        while offer.rounds < MAX_ROUNDS {
            // The buyer's word comes first: a ceiling to meet, or the close.
            let adjusted = ctx.adjustment();
            if adjusted.cancelled {
                return Err(AgentError::new("the buyer walked away"));
            }
            if let Some(ceiling) = adjusted.params.get("ceiling").and_then(|c| c.parse().ok()) {
                if offer.price > ceiling {
                    if ceiling >= terms.floor {
                        offer.price = ceiling;
                    } else {
                        offer.withdrew = true;
                    }
                }
            }
            if offer.withdrew || adjusted.params.get("close").is_some_and(|c| c == "now") {
                return Ok(offer);
            }
            // Tell the others our bid; hear theirs for this round.
            offer.rounds += 1;
            let bid = Bid {
                supplier: terms.supplier.clone(),
                price: offer.price,
            };
            let body = serde_json::to_vec(&bid).map_err(|e| AgentError::new(e.to_string()))?;
            ctx.sync(offer.rounds, &offer.price.to_be_bytes(), &body)
                .await;
            let mut lowest_other = u64::MAX;
            let until = tokio::time::Instant::now() + Duration::from_millis(40);
            while let Ok(Some(event)) = tokio::time::timeout_at(until, ctx.next_sync()).await {
                if let SyncEvent::Sync { body, .. } = event {
                    if let Ok(theirs) = serde_json::from_slice::<Bid>(&body) {
                        lowest_other = lowest_other.min(theirs.price);
                    }
                }
            }
            // Undercut the lowest rival by 2%, never below our floor.
            if lowest_other <= offer.price {
                offer.price = (lowest_other * 98 / 100).max(terms.floor);
            }
            ctx.progress((offer.rounds * 1000 / MAX_ROUNDS) as u16);
        }
        Ok(offer)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cluster = LocalCluster::start(&["mill", "forge", "foundry"]).await?;
    for i in 0..cluster.len() {
        cluster.host(i).add(Supplier, 1).await?;
    }
    cluster.wait_for_agents(3).await?;

    let suppliers = [
        ("mill", 1_000, 640),
        ("forge", 1_100, 610),
        ("foundry", 950, 700),
    ];
    let terms = suppliers.iter().map(|(s, opening, floor)| Terms {
        supplier: s.to_string(),
        opening: *opening,
        floor: *floor,
    });
    let request = SubmitRequest::new("bid", inputs(terms)?)
        .with_tags(["steel"])
        .with_priority(200)
        .with_label("steel contract");
    let buyer = cluster.host(0);
    let (outcome, steering) = tokio::join!(buyer.submit(request), async {
        // Find the running task, let the suppliers bid, then steer.
        let task = loop {
            let status = buyer.status().await?;
            if let Some(t) = status
                .tasks
                .iter()
                .find(|t| t.label.as_deref() == Some("steel contract"))
            {
                break t.task;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        tokio::time::sleep(Duration::from_millis(400)).await;
        let adjust = |params: &[(&str, &str)]| AdjustRequest {
            task,
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            priority: None,
            cancel: false,
        };
        let sent = buyer.adjust(adjust(&[("ceiling", "680")])).await?;
        println!(
            "buyer: ADJUST ceiling=680 reached {} running segments",
            sent.sent
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
        let sent = buyer
            .adjust(adjust(&[("ceiling", "680"), ("close", "now")]))
            .await?;
        println!(
            "buyer: ADJUST close=now reached {} running segments",
            sent.sent
        );
        anyhow::Ok(())
    });
    steering?;
    let outcome = outcome?;
    let offers: Vec<Offer> = results(&outcome)?;
    for o in &offers {
        println!(
            "{:<8} {} after {} rounds{}",
            o.supplier,
            if o.withdrew {
                "withdrew".to_string()
            } else {
                format!("offers {} c/unit", o.price)
            },
            o.rounds,
            if o.withdrew {
                " (ceiling under its floor)"
            } else {
                ""
            }
        );
    }
    let winner = offers
        .iter()
        .filter(|o| !o.withdrew)
        .min_by_key(|o| o.price)
        .ok_or_else(|| anyhow::anyhow!("every supplier withdrew"))?;
    println!("contract: {} at {} c/unit", winner.supplier, winner.price);
    cluster.shutdown().await;
    Ok(())
}
