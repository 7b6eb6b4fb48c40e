//! An outcome whose results are longer than one message reaches a client over the
//! network in pages: the coordinator answers with the results that fit and
//! `more_results`, and the client asks for the rest with [`ResultsRequest`]s and puts
//! the outcome back together ([`Pages`]). Before, such an answer was refused at the
//! sender, and a task that had run gave its client nothing but an error.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use agentmesh_runtime::transport::tls::NodeIdentity;
use agentmesh_runtime::{Client, ClientError, RemoteMessage};
use tracing::{debug, warn};

use crate::service::{ResultsRequest, TaskOutcome, RESULTS_SERVICE};

/// Room a page leaves, below the message limit, for the outcome's other fields (its
/// reason counted apart) and the ENVELOPE around it.
pub const PAGE_SLACK: usize = 64 * 1024;
/// The most msgpack adds to one result (a `bin 32` header).
const RESULT_HEADER: usize = 5;

/// Bytes `outcome`'s results take from `from` on, as sent.
fn bytes_from(outcome: &TaskOutcome, from: usize) -> usize {
    outcome.results[from.min(outcome.results.len())..]
        .iter()
        .map(|r| r.0.len() + RESULT_HEADER)
        .sum()
}

/// What a page of `outcome` may spend on results in a message of `max_message_bytes`.
fn budget(outcome: &TaskOutcome, max_message_bytes: usize) -> usize {
    let reason = outcome.reason.as_ref().map_or(0, String::len);
    max_message_bytes.saturating_sub(PAGE_SLACK + reason)
}

/// Whether `outcome` goes whole in a message of `max_message_bytes`.
pub fn fits(outcome: &TaskOutcome, max_message_bytes: usize) -> bool {
    bytes_from(outcome, 0) <= budget(outcome, max_message_bytes)
}

/// The page of `outcome` that starts at result `from` and fits in a message of
/// `max_message_bytes`: as many results as fit, and at least one while any are left
/// (a result a worker could send fits in a message less a REPORT's own fields).
/// `from` past the last result gives a page with none, starting at the end.
pub fn page(outcome: &TaskOutcome, from: u32, max_message_bytes: usize) -> TaskOutcome {
    let budget = budget(outcome, max_message_bytes);
    let start = (from as usize).min(outcome.results.len());
    let mut end = start;
    let mut used = 0;
    for result in &outcome.results[start..] {
        let len = result.0.len() + RESULT_HEADER;
        if end > start && used + len > budget {
            break;
        }
        used += len;
        end += 1;
    }
    TaskOutcome {
        results: outcome.results[start..end].to_vec(),
        results_from: start as u32,
        more_results: end < outcome.results.len(),
        ..outcome.without_results()
    }
}

/// How long an outcome too large for the ended-task cache (`ended.rs`) is kept for the
/// client fetching its pages, from the task's end.
pub const LARGE_OUTCOME_HOLD_MS: u64 = 60_000;
/// Such outcomes kept at once, at most: the latest.
pub const LARGE_OUTCOMES_HELD: usize = 2;

/// The latest outcomes too large for the ended-task cache, each kept for
/// [`LARGE_OUTCOME_HOLD_MS`] so that its client can fetch the pages after the first
/// (the coordinator held their results while the task ran, so this holds no more at
/// once than the task did, for a minute longer). Bounded by [`LARGE_OUTCOMES_HELD`].
#[derive(Debug, Default)]
pub struct LargeOutcomes {
    held: VecDeque<(TaskOutcome, u64)>,
}

impl LargeOutcomes {
    /// Keeps `outcome`, which ended at `now_ms`, in place of the oldest if need be.
    pub fn hold(&mut self, outcome: TaskOutcome, now_ms: u64) {
        self.expire(now_ms);
        self.held.retain(|(o, _)| o.task != outcome.task);
        while self.held.len() >= LARGE_OUTCOMES_HELD {
            self.held.pop_front();
        }
        self.held
            .push_back((outcome, now_ms.saturating_add(LARGE_OUTCOME_HOLD_MS)));
    }

    /// `task`'s outcome, if it is held and its time has not run out at `now_ms`.
    pub fn get(&self, task: uuid::Uuid, now_ms: u64) -> Option<&TaskOutcome> {
        self.held
            .iter()
            .find(|(o, until)| o.task == task && *until > now_ms)
            .map(|(o, _)| o)
    }

    /// Drops those whose time has run out at `now_ms`.
    pub fn expire(&mut self, now_ms: u64) {
        self.held.retain(|(_, until)| *until > now_ms);
    }

    /// Outcomes held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// True if none is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

/// Why the pages of an outcome could not be put together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PageError {
    /// The node asked keeps no outcome of the task (another member may).
    #[error("{0}")]
    NotHere(String),
    /// The node asked no longer has the rest (it keeps outcomes up to a bound).
    #[error(
        "task {task} completed, but only {have} of its {segments} results reached here: {reason}"
    )]
    Lost {
        /// The task.
        task: uuid::Uuid,
        /// Results received.
        have: u32,
        /// Results it has.
        segments: u32,
        /// What the node said.
        reason: String,
    },
    /// A page that does not follow the ones before.
    #[error("a page of task {task}'s results starts at {from}, but {have} results are here")]
    OutOfOrder {
        /// The task.
        task: uuid::Uuid,
        /// Where the page starts.
        from: u32,
        /// Results received.
        have: u32,
    },
}

/// What to do after a page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// The whole outcome is here.
    Whole(TaskOutcome),
    /// Ask for more (the node that sent the page, or another that keeps the outcome).
    Ask(ResultsRequest),
}

/// An outcome sent in pages, put back together as they come.
#[derive(Debug, Default)]
pub struct Pages {
    so_far: Option<TaskOutcome>,
}

impl Pages {
    /// Nothing received yet.
    pub fn new() -> Pages {
        Pages::default()
    }

    /// Whether a page came that said more follow.
    pub fn started(&self) -> bool {
        self.so_far.is_some()
    }

    /// Takes the next answer: the whole outcome once its last page is in, or what to
    /// ask for next. An answer before any page (the first) may be any outcome.
    pub fn take(&mut self, page: TaskOutcome) -> Result<Next, PageError> {
        let Some(mut so_far) = self.so_far.take() else {
            if page.unknown || (page.results_from == 0 && !page.more_results) {
                return Ok(Next::Whole(page));
            }
            if page.results_from != 0 {
                return Err(PageError::OutOfOrder {
                    task: page.task,
                    from: page.results_from,
                    have: 0,
                });
            }
            let next = ResultsRequest {
                task: page.task,
                from: page.results.len() as u32,
            };
            self.so_far = Some(page);
            return Ok(Next::Ask(next));
        };
        match add(&mut so_far, page) {
            Ok(None) => Ok(Next::Whole(TaskOutcome {
                more_results: false,
                ..so_far
            })),
            Ok(Some(next)) => {
                self.so_far = Some(so_far);
                Ok(Next::Ask(next))
            }
            Err(e) => {
                // Kept: another member may have the rest.
                self.so_far = Some(so_far);
                Err(e)
            }
        }
    }
}

/// Adds `page` to the results `so_far`; what to ask for next, if more follow.
fn add(so_far: &mut TaskOutcome, page: TaskOutcome) -> Result<Option<ResultsRequest>, PageError> {
    let have = so_far.results.len() as u32;
    let reason = || page.reason.clone().unwrap_or_default();
    if page.unknown {
        return Err(PageError::NotHere(reason()));
    }
    if page.task != so_far.task || page.status != so_far.status {
        return Err(PageError::Lost {
            task: so_far.task,
            have,
            segments: so_far.segments,
            reason: reason(),
        });
    }
    if page.results_from > have {
        return Err(PageError::OutOfOrder {
            task: page.task,
            from: page.results_from,
            have,
        });
    }
    let skip = (have - page.results_from) as usize;
    let more = page.more_results;
    so_far.results.extend(page.results.into_iter().skip(skip));
    let now = so_far.results.len() as u32;
    if !more {
        return Ok(None);
    }
    // Each page carries at least one result while any are left.
    if now == have {
        return Err(PageError::OutOfOrder {
            task: so_far.task,
            from: page.results_from,
            have,
        });
    }
    Ok(Some(ResultsRequest {
        task: so_far.task,
        from: now,
    }))
}

/// Why the rest of an outcome could not be had.
#[derive(Debug, thiserror::Error)]
pub enum RestError {
    /// Asking failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The pages did not make an outcome.
    #[error(transparent)]
    Pages(#[from] PageError),
    /// No node asked keeps the outcome.
    #[error("task {task} completed, but only {have} of its results reached here: no node asked keeps its outcome now ({reason})")]
    NotKept {
        /// The task.
        task: uuid::Uuid,
        /// Results received.
        have: u32,
        /// What the last node asked said.
        reason: String,
    },
    /// No node could be asked for so long.
    #[error("task {task} completed, but only {have} of its results reached here: {error}; no node could be asked for the rest for {secs} s")]
    Unreachable {
        /// The task.
        task: uuid::Uuid,
        /// Results received.
        have: u32,
        /// The last failure.
        error: ClientError,
        /// How long it tried.
        secs: u64,
    },
}

/// The whole outcome, given its first page from the node `client` is connected to:
/// asks that node for the rest, each page within `timeout`. A client that may lose its
/// connection meanwhile uses [`rest_from`].
pub async fn rest_of(
    client: &mut Client,
    first: TaskOutcome,
    timeout: Duration,
) -> Result<TaskOutcome, RestError> {
    let mut pages = Pages::new();
    let mut next = first;
    loop {
        let request = match pages.take(next)? {
            Next::Whole(whole) => return Ok(whole),
            Next::Ask(request) => request,
        };
        next = client
            .request(
                RESULTS_SERVICE,
                <ResultsRequest as RemoteMessage>::KIND,
                &request,
                timeout,
            )
            .await?;
    }
}

/// Asks the node at `addr` once, as a short-lived client, for the page of results
/// `request` names (the `ask` of [`rest_from`] for a client that connects anew each
/// time, as `agentmesh submit` does).
pub async fn results_at(
    identity: &NodeIdentity,
    addr: SocketAddr,
    request: ResultsRequest,
    timeout: Duration,
) -> Result<TaskOutcome, ClientError> {
    Client::request_once(
        identity,
        addr,
        RESULTS_SERVICE,
        <ResultsRequest as RemoteMessage>::KIND,
        &request,
        timeout,
    )
    .await
}

/// How [`rest_from`] goes on when nodes cannot be reached.
#[derive(Clone, Copy, Debug)]
pub struct Patience {
    /// How long it tries without a page before it gives up.
    pub within: Duration,
    /// The pause after every node asked failed.
    pub pause: Duration,
}

/// The whole outcome, given its `first` answer: if that says more results follow,
/// asks `nodes` for them in turn, page by page (`ask` sends one [`ResultsRequest`] to
/// one node; the node that sent the first should come first, then the other members:
/// a standby keeps the outcome its coordinator sent with the task's end). A node that
/// gave a page is asked first for the next. While some node cannot be reached it tries
/// again, for up to `patience.within` without a page; if every node answers that it
/// keeps no outcome of the task, it gives up at once.
pub async fn rest_from<A, F, Fut>(
    first: TaskOutcome,
    mut nodes: Vec<A>,
    mut ask: F,
    patience: Patience,
) -> Result<TaskOutcome, RestError>
where
    A: Clone + std::fmt::Display,
    F: FnMut(A, ResultsRequest) -> Fut,
    Fut: std::future::Future<Output = Result<TaskOutcome, ClientError>>,
{
    let mut pages = Pages::new();
    let mut next = match pages.take(first)? {
        Next::Whole(outcome) => return Ok(outcome),
        Next::Ask(request) => request,
    };
    let mut since = tokio::time::Instant::now();
    loop {
        let mut unreachable = None;
        let mut not_kept = String::new();
        let mut answered = None;
        for (i, node) in nodes.iter().enumerate() {
            let page = match ask(node.clone(), next.clone()).await {
                Ok(page) => page,
                Err(error) => {
                    debug!(%node, %error, "no page of the task's results from this node");
                    unreachable = Some(error);
                    continue;
                }
            };
            match pages.take(page) {
                Ok(Next::Whole(outcome)) => return Ok(outcome),
                Ok(Next::Ask(request)) => {
                    next = request;
                    answered = Some(i);
                    break;
                }
                Err(PageError::NotHere(reason)) => not_kept = reason,
                Err(e) => return Err(e.into()),
            }
        }
        if let Some(i) = answered {
            nodes[..=i].rotate_right(1);
            since = tokio::time::Instant::now();
            continue;
        }
        let (task, have) = (next.task, next.from);
        let Some(error) = unreachable else {
            return Err(RestError::NotKept {
                task,
                have,
                reason: not_kept,
            });
        };
        if since.elapsed() >= patience.within {
            return Err(RestError::Unreachable {
                task,
                have,
                error,
                secs: patience.within.as_secs(),
            });
        }
        warn!(%error, %task, "asking again for the rest of the task's results");
        tokio::time::sleep(patience.pause).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::serde_bytes_vec::Blob;
    use crate::service::TaskStatus;

    fn outcome(sizes: &[usize]) -> TaskOutcome {
        TaskOutcome {
            status: TaskStatus::Completed,
            completed: sizes.len() as u32,
            results: sizes
                .iter()
                .enumerate()
                .map(|(i, n)| Blob(vec![i as u8; *n]))
                .collect(),
            ..TaskOutcome::refused(uuid::Uuid::from_u128(7), sizes.len() as u32, String::new())
        }
    }

    fn whole(mut o: TaskOutcome) -> TaskOutcome {
        o.reason = None;
        o
    }

    #[test]
    fn large_outcomes_are_held_a_minute_and_the_latest_two_at_most() {
        let task = |n: u128| TaskOutcome {
            task: uuid::Uuid::from_u128(n),
            ..whole(outcome(&[1]))
        };
        let mut held = LargeOutcomes::default();
        held.hold(task(1), 0);
        assert_eq!(
            held.get(task(1).task, LARGE_OUTCOME_HOLD_MS - 1),
            Some(&task(1))
        );
        assert_eq!(held.get(task(1).task, LARGE_OUTCOME_HOLD_MS), None);
        held.hold(task(2), 10);
        held.hold(task(3), 20);
        assert_eq!(held.len(), 2);
        assert_eq!(held.get(task(1).task, 30), None, "the oldest made room");
        assert!(held.get(task(2).task, 30).is_some());
        held.hold(task(3), 40);
        assert_eq!(held.len(), 2, "the same task is held once");
        held.expire(10 + LARGE_OUTCOME_HOLD_MS);
        assert_eq!(held.len(), 1);
        held.expire(40 + LARGE_OUTCOME_HOLD_MS);
        assert!(held.is_empty());
    }

    #[test]
    fn an_outcome_that_fits_goes_whole() {
        let o = whole(outcome(&[10, 20, 30]));
        let limit = PAGE_SLACK + 75;
        assert!(fits(&o, limit));
        assert_eq!(page(&o, 0, limit), o);
        assert!(!fits(&o, limit - 1));
    }

    #[test]
    fn pages_carry_what_fits_and_at_least_one_result() {
        let o = whole(outcome(&[10, 20, 30, 100]));
        let limit = PAGE_SLACK + 40;
        let first = page(&o, 0, limit);
        assert_eq!(first.results, o.results[..2]);
        assert_eq!((first.results_from, first.more_results), (0, true));
        // The next result alone is larger than the page: it goes alone.
        let second = page(&o, 2, limit);
        assert_eq!(second.results, o.results[2..3]);
        let last = page(&o, 3, limit);
        assert_eq!(last.results, o.results[3..]);
        assert_eq!((last.results_from, last.more_results), (3, false));
        let past = page(&o, 9, limit);
        assert!(past.results.is_empty());
        assert_eq!((past.results_from, past.more_results), (4, false));
    }

    #[test]
    fn pages_taken_in_turn_give_back_the_whole_outcome() {
        let o = whole(outcome(&[7; 50]));
        let limit = PAGE_SLACK + 40;
        let mut pages = Pages::new();
        let mut next = page(&o, 0, limit);
        let mut asked = 0;
        let got = loop {
            let request = match pages.take(next).unwrap() {
                Next::Whole(got) => break got,
                Next::Ask(request) => request,
            };
            assert_eq!(request.task, o.task);
            asked += 1;
            next = page(&o, request.from, limit);
        };
        assert_eq!(got, o);
        assert_eq!(asked, 16, "three results of 12 bytes in each page");
    }

    #[test]
    fn a_page_asked_again_adds_only_what_is_new() {
        let o = whole(outcome(&[7; 6]));
        let limit = PAGE_SLACK + 36;
        let mut pages = Pages::new();
        let ask = |from| Ok(Next::Ask(ResultsRequest { task: o.task, from }));
        assert_eq!(pages.take(page(&o, 0, limit)), ask(3));
        assert_eq!(pages.take(page(&o, 1, limit)), ask(4));
        assert_eq!(pages.take(page(&o, 4, limit)), Ok(Next::Whole(o.clone())));
    }

    #[test]
    fn pages_that_do_not_follow_or_stop_coming_are_errors() {
        let o = whole(outcome(&[7; 6]));
        let limit = PAGE_SLACK + 36;
        let mut pages = Pages::new();
        assert!(matches!(
            pages.take(page(&o, 3, limit)),
            Err(PageError::OutOfOrder {
                from: 3,
                have: 0,
                ..
            })
        ));
        pages.take(page(&o, 0, limit)).unwrap();
        assert!(matches!(
            pages.take(page(&o, 4, limit)),
            Err(PageError::OutOfOrder {
                from: 4,
                have: 3,
                ..
            })
        ));
        let forgotten = TaskOutcome::refused(o.task, 6, "no longer kept".into());
        let lost = pages.take(forgotten).unwrap_err();
        assert_eq!(
            lost.to_string(),
            format!(
                "task {} completed, but only 3 of its 6 results reached here: no longer kept",
                o.task
            )
        );
        let unknown = TaskOutcome {
            unknown: true,
            ..TaskOutcome::refused(o.task, 0, "not known here".into())
        };
        assert_eq!(
            pages.take(unknown),
            Err(PageError::NotHere("not known here".into()))
        );
        // A page that repeats what is here and says more follow makes no progress.
        let stuck = TaskOutcome {
            more_results: true,
            ..page(&o, 0, limit)
        };
        assert!(matches!(
            pages.take(stuck),
            Err(PageError::OutOfOrder {
                from: 0,
                have: 3,
                ..
            })
        ));
    }
}
