//! Answers to requests from other nodes, sent from the local actor's reply itself: a
//! waiting request is its own waker, so the answer leaves on the thread that gives it,
//! with no task hop between the actor and the connection (a task sends it only when
//! the lane is busy), and a deadline queue answers for actors that never reply.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;
use tokio::task::Unconstrained;
use tokio::time::Instant;
use tracing::debug;

use agentmesh_transport::wire::EnvelopeParts;

use crate::client::{ERROR_KIND, UNANSWERED_KIND};
use crate::remote::{write_message, Mesh, Offer, RemoteMessage, SendError};

/// Answers a node waits to give at once; a request beyond them is answered with an
/// error straight away.
pub(crate) const MAX_WAITING_ANSWERS: usize = 65_536;
/// How often the deadlines of waiting answers are checked: a request whose actor never
/// answers gets its error up to this much after its timeout.
const SWEEP_EVERY: Duration = Duration::from_millis(250);
/// Ended entries the deadline queues may hold beyond twice the waiting answers before
/// they are compacted.
const SLACK_ENTRIES: usize = 64;

/// The answer a local actor is to give to a request, type-erased.
pub(crate) trait PendingReply: Send + Sync {
    /// Ready once the actor has answered (or dropped its reply port: an error, sent as
    /// [`Outcome::Unanswered`]).
    fn poll_reply(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), String>>;
    /// Writes the answer the actor gave (after `poll_reply` was ready with `Ok`).
    fn write(&self, out: &mut Vec<u8>) -> Result<(), SendError>;
}

/// [`PendingReply`] for a ractor reply port's receiving end.
pub(crate) struct Replying<Resp> {
    // Unconstrained: tokio's cooperative budget must not make a poll pending without
    // registering the waker, which would wake this answer again from inside its poll.
    rx: Unconstrained<oneshot::Receiver<Resp>>,
    value: Option<Resp>,
}

impl<Resp> Replying<Resp> {
    pub(crate) fn new(rx: oneshot::Receiver<Resp>) -> Replying<Resp> {
        Replying {
            rx: tokio::task::unconstrained(rx),
            value: None,
        }
    }
}

impl<Resp: RemoteMessage> PendingReply for Replying<Resp> {
    fn poll_reply(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), String>> {
        match Pin::new(&mut self.rx).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(value)) => {
                self.value = Some(value);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(_)) => {
                Poll::Ready(Err("the actor dropped the request without answering".into()))
            }
        }
    }

    fn write(&self, out: &mut Vec<u8>) -> Result<(), SendError> {
        match &self.value {
            Some(value) => write_message(out, value),
            None => Err(SendError::Encode("no answer was given".into())),
        }
    }
}

/// Where an answer goes: the requesting node, and the request's fields it echoes.
pub(crate) struct ReplyTo {
    pub(crate) peer: String,
    /// The request's Stream Prio: an urgent ask is answered on the urgent lane.
    pub(crate) prio: u8,
    pub(crate) correlation: u64,
    pub(crate) kind: String,
    pub(crate) trace_id: Option<Bytes>,
}

impl ReplyTo {
    /// Appends the answering ENVELOPE to `out`: the actor's answer, or `error`. An
    /// answer that does not encode, or is longer than `limit` (the asker would close
    /// the connection for it), is sent as an error instead.
    fn encode(&self, answer: &Outcome, out: &mut Vec<u8>, limit: usize) {
        let parts = |kind, body| EnvelopeParts {
            to: "",
            kind,
            correlation: self.correlation,
            reply: true,
            trace_id: self.trace_id.as_deref(),
            body,
        };
        let start = out.len();
        let error = match answer {
            Outcome::Given(reply) => {
                match parts(&self.kind, &[]).encode_into_with(out, |out| reply.write(out)) {
                    Ok(()) if out.len() - start <= limit => return,
                    Ok(()) => {
                        let len = out.len() - start;
                        out.truncate(start);
                        format!("the answer is {len} bytes, more than the {limit} one message may carry")
                    }
                    Err(e) => {
                        out.truncate(start);
                        e.to_string()
                    }
                }
            }
            Outcome::Error(error) => error.clone(),
            Outcome::Unanswered(reason) => {
                return parts(UNANSWERED_KIND, reason.as_bytes()).encode_into(out);
            }
        };
        parts(ERROR_KIND, error.as_bytes()).encode_into(out);
    }
}

/// A request from another node waiting for a local actor's answer. It is the waker of
/// the actor's reply port, so the actor's `reply.send(..)` sends the answer.
pub(crate) struct Answering {
    mesh: Weak<crate::remote::Inner>,
    to: ReplyTo,
    /// Where a busy lane's answer is sent from (a waker may run off the runtime).
    runtime: tokio::runtime::Handle,
    /// The answer to come; taken (once) when it is given or its time is up.
    reply: Mutex<Option<Box<dyn PendingReply>>>,
}

impl Wake for Answering {
    fn wake(self: Arc<Self>) {
        self.poll();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.poll();
    }
}

impl Answering {
    /// Starts waiting for `reply`: registers it with `mesh`'s deadlines and polls it
    /// once, which either sends the answer (the actor was quick) or sets the waker.
    pub(crate) fn start(mesh: &Mesh, to: ReplyTo, reply: Box<dyn PendingReply>, timeout: Duration) {
        let waiting = &mesh.inner.answers;
        if !waiting.admit() {
            let error = format!(
                "{MAX_WAITING_ANSWERS} requests already wait for answers on node {}",
                mesh.node()
            );
            return send(
                mesh,
                &to,
                &tokio::runtime::Handle::current(),
                Outcome::Error(error),
            );
        }
        let answering = Arc::new(Answering {
            mesh: Arc::downgrade(&mesh.inner),
            to,
            runtime: tokio::runtime::Handle::current(),
            reply: Mutex::new(Some(reply)),
        });
        waiting.watch(mesh, &answering, timeout);
        answering.poll();
    }

    fn poll(self: &Arc<Self>) {
        let mut slot = self.reply.lock().unwrap_or_else(|e| e.into_inner());
        let Some(reply) = slot.as_mut() else { return };
        let waker = Waker::from(self.clone());
        let given = match reply.poll_reply(&mut Context::from_waker(&waker)) {
            Poll::Pending => return,
            Poll::Ready(given) => given,
        };
        let Some(reply) = slot.take() else { return };
        drop(slot);
        self.finish(match given {
            Ok(()) => Outcome::Given(reply),
            Err(error) => Outcome::Unanswered(error),
        });
    }

    /// The request's time is up: answers it with an error if it still waits.
    fn time_out(&self, timeout: Duration) {
        let reply = self.reply.lock().unwrap_or_else(|e| e.into_inner()).take();
        if reply.is_some() {
            let error = format!("the actor did not answer within {} s", timeout.as_secs());
            self.finish(Outcome::Error(error));
        }
    }

    fn is_waiting(&self) -> bool {
        self.reply
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// The answer is decided (it was taken from `reply`): sends it.
    fn finish(&self, outcome: Outcome) {
        let Some(inner) = self.mesh.upgrade() else {
            return;
        };
        let mesh = Mesh { inner };
        mesh.inner.answers.release();
        send(&mesh, &self.to, &self.runtime, outcome);
    }
}

/// A request's answer, once decided.
pub(crate) enum Outcome {
    /// The actor answered.
    Given(Box<dyn PendingReply>),
    /// No answer: why.
    Error(String),
    /// The actor dropped the request without answering: it stopped (its node may be
    /// leaving) or failed while it held the request, which may or may not have taken
    /// effect. Sent apart from [`Outcome::Error`] so that a client can tell it from a
    /// refusal, and ask again or ask another node, as for a lost connection.
    Unanswered(String),
}

/// Sends an answer from this thread if its lane takes it at once, or else from a task
/// that waits for room in the lane's queue (with the bytes encoded here: the answer is
/// encoded once either way).
pub(crate) fn send(mesh: &Mesh, to: &ReplyTo, runtime: &tokio::runtime::Handle, outcome: Outcome) {
    let limit = mesh.max_message_bytes();
    let offered = mesh.try_send_encoded(&to.peer, to.prio, |out| {
        to.encode(&outcome, out, limit);
        Ok(())
    });
    drop(outcome);
    match offered {
        Ok(Offer::Taken) => {}
        Err(e) => debug!(peer = %to.peer, error = %e, "answer not sent"),
        Ok(Offer::Busy(envelope)) => {
            let (mesh, peer, prio) = (mesh.clone(), to.peer.clone(), to.prio);
            runtime.spawn(async move {
                let sent = mesh
                    .send_encoded(&peer, prio, |out| {
                        out.extend_from_slice(&envelope);
                        Ok(())
                    })
                    .await;
                if let Err(e) = sent {
                    debug!(%peer, error = %e, "answer not sent");
                }
            });
        }
    }
}

/// The deadlines of the answers a node waits to give.
#[derive(Default)]
pub(crate) struct Waiting {
    /// Answers waiting now.
    live: AtomicUsize,
    queues: Mutex<Queues>,
}

/// Answers by deadline, earliest first.
type DeadlineQueue = VecDeque<(Instant, Weak<Answering>)>;

/// One queue per answer timeout, each in deadline order (a deadline is its entry's
/// start plus the queue's timeout), holding answers that may have ended since.
#[derive(Default)]
struct Queues {
    by_timeout: Vec<(Duration, DeadlineQueue)>,
    entries: usize,
    sweeping: bool,
}

impl Waiting {
    /// Counts one more waiting answer, unless [`MAX_WAITING_ANSWERS`] already wait.
    fn admit(&self) -> bool {
        // Compare-and-swap, as `Intake::admit` does: with an add undone on overflow, a
        // refused admit's brief +1 could get another refused while a place is free.
        self.live
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < MAX_WAITING_ANSWERS).then_some(n + 1)
            })
            .is_ok()
    }

    /// An admitted answer was given (or its time ran out).
    fn release(&self) {
        self.live.fetch_sub(1, Ordering::Relaxed);
    }

    fn watch(&self, mesh: &Mesh, answering: &Arc<Answering>, timeout: Duration) {
        let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        let live = self.live.load(Ordering::Relaxed);
        queues.push(answering, timeout, Instant::now(), live);
        if !queues.sweeping {
            queues.sweeping = true;
            tokio::spawn(sweep(Arc::downgrade(&mesh.inner)));
        }
    }
}

impl Queues {
    /// Adds `answering`'s deadline (`now` + `timeout`), and drops the entries of ended
    /// answers once they outnumber the `live` ones by [`SLACK_ENTRIES`] and more.
    fn push(&mut self, answering: &Arc<Answering>, timeout: Duration, now: Instant, live: usize) {
        let index = match self.by_timeout.iter().position(|(t, _)| *t == timeout) {
            Some(i) => i,
            None => {
                self.by_timeout.push((timeout, VecDeque::new()));
                self.by_timeout.len() - 1
            }
        };
        self.by_timeout[index]
            .1
            .push_back((now + timeout, Arc::downgrade(answering)));
        self.entries += 1;
        if self.entries > 2 * live + SLACK_ENTRIES {
            for (_, queue) in &mut self.by_timeout {
                queue.retain(|(_, a)| a.upgrade().is_some_and(|a| a.is_waiting()));
            }
            self.count();
        }
    }

    /// Takes the entries due by `now`, with their timeouts. With no answer `live`, every
    /// entry has ended and all go, so the sweeper stops once the last answer is given
    /// rather than when the last deadline passes.
    fn due(&mut self, now: Instant, live: usize) -> Vec<(Arc<Answering>, Duration)> {
        if live == 0 {
            self.by_timeout
                .iter_mut()
                .for_each(|(_, queue)| queue.clear());
            self.entries = 0;
            return Vec::new();
        }
        let mut due = Vec::new();
        for (timeout, queue) in &mut self.by_timeout {
            while queue.front().is_some_and(|(deadline, _)| *deadline <= now) {
                if let Some((_, answering)) = queue.pop_front() {
                    due.extend(answering.upgrade().map(|a| (a, *timeout)));
                }
            }
        }
        self.count();
        due
    }

    fn count(&mut self) {
        self.entries = self.by_timeout.iter().map(|(_, queue)| queue.len()).sum();
    }
}

/// Answers with an error every request whose time is up, while any wait.
async fn sweep(mesh: Weak<crate::remote::Inner>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let Some(inner) = mesh.upgrade() else { return };
        let due = {
            let mut queues = inner
                .answers
                .queues
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            // Read under the lock: an answer admitted after this read registers after
            // the lock is let go, and starts a sweeper if this one stops.
            let live = inner.answers.live.load(Ordering::Relaxed);
            let due = queues.due(Instant::now(), live);
            if queues.entries == 0 && due.is_empty() {
                queues.sweeping = false;
                return;
            }
            due
        };
        drop(inner);
        for (answering, timeout) in due {
            answering.time_out(timeout);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An actor that has not answered yet.
    struct NotYet;

    impl PendingReply for NotYet {
        fn poll_reply(&mut self, _: &mut Context<'_>) -> Poll<Result<(), String>> {
            Poll::Pending
        }

        fn write(&self, _: &mut Vec<u8>) -> Result<(), SendError> {
            Err(SendError::Encode("no answer".into()))
        }
    }

    fn waiting_answer(correlation: u64) -> Arc<Answering> {
        Arc::new(Answering {
            mesh: Weak::new(),
            to: ReplyTo {
                peer: "b".into(),
                prio: 96,
                correlation,
                kind: "k".into(),
                trace_id: None,
            },
            runtime: tokio::runtime::Handle::current(),
            reply: Mutex::new(Some(Box::new(NotYet))),
        })
    }

    /// The answer was given: what `poll` does before it sends.
    fn end(answering: &Answering) {
        answering.reply.lock().unwrap().take();
    }

    #[test]
    fn no_more_than_the_bound_wait_at_once() {
        let waiting = Waiting::default();
        for _ in 0..MAX_WAITING_ANSWERS {
            assert!(waiting.admit());
        }
        assert!(!waiting.admit(), "one past the bound was admitted");
        assert!(!waiting.admit());
        assert_eq!(waiting.live.load(Ordering::Relaxed), MAX_WAITING_ANSWERS);
        waiting.release();
        assert!(waiting.admit(), "a freed place is not taken again");
        assert!(!waiting.admit());
    }

    #[tokio::test]
    async fn due_answers_come_out_by_deadline_per_timeout() {
        let mut q = Queues::default();
        let t0 = Instant::now();
        let (short, long) = (Duration::from_secs(1), Duration::from_secs(5));
        let answers: Vec<_> = (0..5).map(waiting_answer).collect();
        for (i, a) in answers.iter().enumerate() {
            let timeout = if i % 2 == 0 { short } else { long };
            q.push(a, timeout, t0 + Duration::from_millis(i as u64), 5);
        }
        assert!(q.due(t0 + Duration::from_millis(999), 5).is_empty());
        let due = q.due(t0 + Duration::from_millis(1_003), 5);
        let due: Vec<_> = due.iter().map(|(a, t)| (a.to.correlation, *t)).collect();
        assert_eq!(
            due,
            vec![(0, short), (2, short)],
            "the fifth ms's is not due yet"
        );
        assert_eq!(q.entries, 3);
        let due = q.due(t0 + Duration::from_secs(10), 3);
        let due: Vec<_> = due.iter().map(|(a, _)| a.to.correlation).collect();
        assert_eq!(due, vec![4, 1, 3]);
        assert_eq!(q.entries, 0);
    }

    #[tokio::test]
    async fn ended_answers_leave_no_entries_behind() {
        let mut q = Queues::default();
        let t0 = Instant::now();
        let timeout = Duration::from_secs(30);
        // Ten answers stay waiting; thousands more are each given right away.
        let kept: Vec<_> = (0..10).map(waiting_answer).collect();
        for a in &kept {
            q.push(a, timeout, t0, kept.len());
        }
        let mut most = 0;
        for i in 0..5_000 {
            let a = waiting_answer(100 + i);
            q.push(&a, timeout, t0, kept.len() + 1);
            end(&a);
            most = most.max(q.entries);
        }
        assert!(
            most <= 2 * (kept.len() + 1) + SLACK_ENTRIES + 1,
            "{most} entries for {} waiting answers",
            kept.len()
        );
        // Nothing is due before the deadline, and then exactly the ten still waiting.
        assert!(q.due(t0 + Duration::from_secs(29), kept.len()).is_empty());
        let due = q.due(t0 + timeout, kept.len());
        let mut due: Vec<_> = due.iter().map(|(a, _)| a.to.correlation).collect();
        due.sort_unstable();
        assert_eq!(due, (0..10).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn with_no_answer_waiting_every_entry_goes_at_once() {
        let mut q = Queues::default();
        let t0 = Instant::now();
        let answers: Vec<_> = (0..20).map(waiting_answer).collect();
        for a in &answers {
            q.push(a, Duration::from_secs(30), t0, answers.len());
            end(a);
        }
        assert_eq!(
            q.entries, 20,
            "below the slack, ended entries wait for a sweep"
        );
        assert!(q.due(t0 + Duration::from_millis(250), 0).is_empty());
        assert_eq!(q.entries, 0, "the sweeper would go on for 30 s");
    }
}
