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

use crate::client::ERROR_KIND;
use crate::remote::{write_message, Mesh, RemoteMessage, SendError};

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
    /// Ready once the actor has answered (or dropped its reply port: an error).
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

#[derive(Clone)]
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
    /// answer that does not encode is sent as an error instead.
    fn encode(&self, answer: Result<&dyn PendingReply, &str>, out: &mut Vec<u8>) {
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
            Ok(reply) => match parts(&self.kind, &[]).encode_into_with(out, |out| reply.write(out))
            {
                Ok(()) => return,
                Err(e) => {
                    out.truncate(start);
                    e.to_string()
                }
            },
            Err(error) => error.to_string(),
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
        if waiting.live.fetch_add(1, Ordering::Relaxed) >= MAX_WAITING_ANSWERS {
            waiting.live.fetch_sub(1, Ordering::Relaxed);
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
            Err(error) => Outcome::Error(error),
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
        mesh.inner.answers.live.fetch_sub(1, Ordering::Relaxed);
        send(&mesh, &self.to, &self.runtime, outcome);
    }
}

/// A request's answer, once decided.
pub(crate) enum Outcome {
    /// The actor answered.
    Given(Box<dyn PendingReply>),
    /// No answer: why.
    Error(String),
}

impl Outcome {
    fn as_answer(&self) -> Result<&dyn PendingReply, &str> {
        match self {
            Outcome::Given(reply) => Ok(&**reply),
            Outcome::Error(error) => Err(error),
        }
    }
}

/// Sends an answer from this thread if its lane takes it at once, or else from a task
/// that waits for room in the lane's queue.
pub(crate) fn send(mesh: &Mesh, to: &ReplyTo, runtime: &tokio::runtime::Handle, outcome: Outcome) {
    let sent = mesh.try_send_encoded(&to.peer, to.prio, |out| {
        to.encode(outcome.as_answer(), out);
        Ok(())
    });
    match sent {
        Ok(true) => {}
        Err(e) => debug!(peer = %to.peer, error = %e, "answer not sent"),
        Ok(false) => {
            let (mesh, to) = (mesh.clone(), to.clone());
            runtime.spawn(async move {
                let sent = mesh
                    .send_encoded(&to.peer, to.prio, |out| {
                        to.encode(outcome.as_answer(), out);
                        Ok(())
                    })
                    .await;
                if let Err(e) = sent {
                    debug!(peer = %to.peer, error = %e, "answer not sent");
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
    fn watch(&self, mesh: &Mesh, answering: &Arc<Answering>, timeout: Duration) {
        let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        let q = &mut *queues;
        let index = match q.by_timeout.iter().position(|(t, _)| *t == timeout) {
            Some(i) => i,
            None => {
                q.by_timeout.push((timeout, VecDeque::new()));
                q.by_timeout.len() - 1
            }
        };
        q.by_timeout[index]
            .1
            .push_back((Instant::now() + timeout, Arc::downgrade(answering)));
        q.entries += 1;
        let live = self.live.load(Ordering::Relaxed);
        if q.entries > 2 * live + SLACK_ENTRIES {
            for (_, queue) in &mut q.by_timeout {
                queue.retain(|(_, a)| a.upgrade().is_some_and(|a| a.is_waiting()));
            }
            q.entries = q.by_timeout.iter().map(|(_, queue)| queue.len()).sum();
        }
        if !q.sweeping {
            q.sweeping = true;
            tokio::spawn(sweep(Arc::downgrade(&mesh.inner)));
        }
    }
}

/// Answers with an error every request whose time is up, while any wait.
async fn sweep(mesh: Weak<crate::remote::Inner>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let Some(inner) = mesh.upgrade() else { return };
        let now = Instant::now();
        let mut due = Vec::new();
        {
            let mut queues = inner
                .answers
                .queues
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let q = &mut *queues;
            for (timeout, queue) in &mut q.by_timeout {
                while queue.front().is_some_and(|(deadline, _)| *deadline <= now) {
                    if let Some((_, answering)) = queue.pop_front() {
                        due.extend(answering.upgrade().map(|a| (a, *timeout)));
                    }
                }
            }
            q.entries = q.by_timeout.iter().map(|(_, queue)| queue.len()).sum();
            if q.entries == 0 && due.is_empty() {
                q.sweeping = false;
                return;
            }
        }
        drop(inner);
        for (answering, timeout) in due {
            answering.time_out(timeout);
        }
    }
}
