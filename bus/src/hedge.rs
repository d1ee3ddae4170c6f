//! A request to a queue group, hedged, so that a dead, frozen or stopping member does not fail
//! it while another member is alive. The dispatcher calls agents this way, and the hookpoint
//! client ([`crate::Client`]) calls dispatchers this way.
//!
//! NATS gives no signal that a queue member died (after `kill -9` the server drops its
//! subscription, but a request already routed to it is lost) or froze (after SIGSTOP its
//! connection stays open and the server keeps routing to it). So the dispatcher *hedges*: when
//! no answer has come after a delay learned from the kind's own latency, it sends the same
//! request again, which the queue group routes to an instance picked at random, and again
//! after each further delay, until an answer comes or the timeout. The first answer wins; later
//! ones are dropped. "No responders" (no instance subscribed right now: reconnecting, starting)
//! is asked again after a short pause, also until the timeout.
//!
//! An agent may so receive the same request twice: it must answer it the same way, or undo
//! what the duplicate took (conn-limit's slot is one per connection and lists the runs holding
//! it, so a duplicate shares the original's, and a denied run's undo takes it out). Every request carries its deadline (`Policy-Deadline`), so an agent
//! does not start work on a request the dispatcher has already given up on.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::HeaderMap;
use bytes::Bytes;

use crate::headers;
use crate::transport::{request, ClientError};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::time::Instant;

/// Requests per agent call at most: the first and its hedges. With one of two instances frozen,
/// the chance that every one of them lands on it is 2^-16.
pub const MAX_SENDS: u32 = 16;
/// Hedge delay before the latency is known.
const FIRST_DELAY: Duration = Duration::from_millis(20);
/// The shortest hedge delay for an agent call: not so short that a busy agent is flooded.
const MIN_DELAY: Duration = Duration::from_millis(2);

/// A queue group's recent answer latency (an exponentially weighted mean), from which its
/// hedge delay follows, and how far to hedge. Shared by every call to the same group.
#[derive(Debug)]
pub struct Latency {
    ewma_us: AtomicU64,
    floor: Duration,
    max_sends: u32,
    /// Whether a call that finds its own connection down waits for it (within the timeout)
    /// and asks again, rather than failing at once.
    wait_reconnect: bool,
    /// The hedge budget: every call earns one hedge, every hedge spends one, up to
    /// [`HEDGE_BURST`] saved. A dead or frozen instance costs far less than one hedge per call
    /// on average, so it never runs out; an overloaded kind, whose every call is slow, gets at
    /// most one copy more per call instead of sixteen, which would only bury it deeper.
    budget: AtomicU64,
}

/// Hedges a group may save up: enough for a burst of calls stuck at a dead instance.
const HEDGE_BURST: u64 = 1_000;

impl Default for Latency {
    /// An agent kind's: hedged early and often, since agents answer in about a millisecond and
    /// a frozen instance may hold half of them; and through a reconnect of the dispatcher.
    fn default() -> Self {
        Latency {
            wait_reconnect: true,
            ..Latency::new(MIN_DELAY, MAX_SENDS)
        }
    }
}

impl Latency {
    /// A hedge no sooner than `floor`, and at most `max_sends` requests per call.
    pub fn new(floor: Duration, max_sends: u32) -> Self {
        Latency {
            ewma_us: AtomicU64::new(0),
            floor,
            max_sends: max_sends.max(1),
            wait_reconnect: false,
            budget: AtomicU64::new(HEDGE_BURST),
        }
    }

    /// A call started: it earns one hedge for the group.
    fn earn(&self) {
        let _ = self
            .budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                (b < HEDGE_BURST).then_some(b + 1)
            });
    }

    /// Takes one hedge from the budget; `false` when it is spent.
    fn spend(&self) -> bool {
        self.budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1))
            .is_ok()
    }

    pub fn observe(&self, took: Duration) {
        let us = took.as_micros().min(u128::from(u64::MAX / 8)) as u64;
        // Races between concurrent updates lose an observation at worst.
        let old = self.ewma_us.load(Ordering::Relaxed);
        let new = if old == 0 { us } else { (old * 7 + us) / 8 };
        self.ewma_us.store(new.max(1), Ordering::Relaxed);
    }

    /// Four times the usual answer time: long enough that a healthy instance has answered,
    /// short enough that a dead one costs little of the timeout; and short enough that every
    /// copy fits in the timeout (under load the usual time grows, and a frozen instance must
    /// still be outnumbered). An instance drops a copy of a request it is already working on,
    /// so short delays do not multiply the work.
    pub fn hedge_delay(&self, timeout: Duration) -> Duration {
        let us = self.ewma_us.load(Ordering::Relaxed);
        let delay = if us == 0 {
            FIRST_DELAY
        } else {
            Duration::from_micros(us * 4)
        };
        let spread = (timeout / self.max_sends).max(MIN_DELAY);
        delay.max(self.floor).min(spread)
    }
}

/// The requests a process is working on, by key (event id and subject): a hedged copy of one
/// of them that reaches the same process is dropped rather than done twice; the sender's
/// copies on other instances, or the first, answer it.
#[derive(Debug, Default)]
pub struct InProgress(std::sync::Mutex<std::collections::HashSet<String>>);

/// A request's place in [`InProgress`], given up when dropped.
pub struct Working<'a> {
    set: &'a InProgress,
    key: String,
}

impl InProgress {
    /// Takes `key`'s place; `None` when a request with that key is already in progress here.
    pub fn start(&self, key: String) -> Option<Working<'_>> {
        let fresh = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone());
        fresh.then_some(Working { set: self, key })
    }
}

impl Drop for Working<'_> {
    fn drop(&mut self) {
        self.set
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}

/// Whether a request's `Policy-Deadline` (Unix ms) has passed: its sender has stopped waiting.
pub fn past_deadline(h: Option<&HeaderMap>) -> bool {
    let Some(deadline) =
        headers::get(h, headers::POLICY_DEADLINE).and_then(|v| v.parse::<u128>().ok())
    else {
        return false;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    now > deadline
}

/// The deadline header's value: Unix milliseconds.
fn deadline_ms(after: Duration) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (now + after).as_millis().to_string()
}

/// One request, hedged. Returns the first answer (an error reply is an answer), or the last
/// failure once the timeout is over.
pub async fn ask(
    nats: &async_nats::Client,
    subject: &str,
    headers: HeaderMap,
    payload: Bytes,
    timeout: Duration,
    latency: &Latency,
) -> Result<async_nats::Message, ClientError> {
    ask_counted(nats, subject, headers, payload, timeout, latency)
        .await
        .0
}

/// [`ask`], also saying how many copies of the request were sent: with more than one, a copy
/// other than the one answered may still be at work (and take what an undo must give back).
pub async fn ask_counted(
    nats: &async_nats::Client,
    subject: &str,
    mut headers: HeaderMap,
    payload: Bytes,
    timeout: Duration,
    latency: &Latency,
) -> (Result<async_nats::Message, ClientError>, u32) {
    let start = Instant::now();
    let deadline = start + timeout;
    headers.insert(
        headers::name(headers::POLICY_DEADLINE),
        deadline_ms(timeout).as_str(),
    );
    let delay = latency.hedge_delay(timeout);
    // A hookpoint wants to hear at once that its connection dropped; a dispatcher's call waits
    // for the reconnect and sends another copy, so it needs no watch.
    let watch_drop = !latency.wait_reconnect;
    // Each request remembers when it left: the latency learned is the answering request's
    // own, not the call's (which includes the wait for the hedge, and would feed back into an
    // ever longer hedge delay while an instance is frozen). The loop below keeps the deadline,
    // so the request itself has no timer.
    let send = |headers: HeaderMap| {
        let sent_at = Instant::now();
        let request = request(
            nats,
            subject.to_string(),
            headers,
            payload.clone(),
            None,
            watch_drop,
        );
        async move { (request.await, sent_at) }
    };
    let next_hedge = start + delay;
    latency.earn();
    // The usual case, answered before the first hedge is due, costs one request and one timer.
    let mut first = Box::pin(send(headers.clone()));
    let mut first_failure = None;
    if latency.max_sends > 1 && next_hedge < deadline {
        tokio::select! {
            biased;
            (reply, sent_at) = &mut first => match reply {
                Ok(msg) => {
                    latency.observe(sent_at.elapsed());
                    return (Ok(msg), 1);
                }
                Err(e @ ClientError::Remote(_)) => return (Err(e), 1),
                Err(e) => first_failure = Some(e),
            },
            _ = tokio::time::sleep_until(next_hedge) => {}
        }
    }
    hedged(HedgeCall {
        // A first request that came back failed is not waited on again.
        first: first_failure.is_none().then_some(first),
        first_failure,
        send: &send,
        headers,
        subject,
        timeout,
        deadline,
        delay,
        next_hedge,
        latency,
    })
    .await
}

/// A call that was not answered before its first hedge was due (or whose first request
/// failed at once): the copies, retries and deadline.
struct HedgeCall<'a, S, F> {
    first: Option<std::pin::Pin<Box<F>>>,
    first_failure: Option<ClientError>,
    send: &'a S,
    headers: HeaderMap,
    subject: &'a str,
    timeout: Duration,
    deadline: Instant,
    delay: Duration,
    next_hedge: Instant,
    latency: &'a Latency,
}

async fn hedged<S, F>(call: HedgeCall<'_, S, F>) -> (Result<async_nats::Message, ClientError>, u32)
where
    S: Fn(HeaderMap) -> F,
    F: std::future::Future<Output = (Result<async_nats::Message, ClientError>, Instant)>,
{
    let HedgeCall {
        first,
        first_failure,
        send,
        headers,
        subject,
        timeout,
        deadline,
        delay,
        mut next_hedge,
        latency,
    } = call;
    let start = deadline - timeout;
    let send = |_left: Duration| Box::pin(send(headers.clone()));
    let mut pending = FuturesUnordered::new();
    pending.extend(first);
    let mut sent = 1;
    // Every copy sent, retries after a failure too (a dropped connection may have delivered).
    let mut copies = 1;
    let mut pause = Duration::from_millis(5);
    let mut retry_at: Option<Instant> = None;
    let mut last = None;
    // A first request that failed at once is handled as if it had just come back.
    if let Some(e) = first_failure {
        match e {
            ClientError::Disconnected { .. } if !latency.wait_reconnect => return (Err(e), copies),
            ClientError::NoResponders { .. } | ClientError::Disconnected { .. } => {
                if Instant::now() + pause < deadline {
                    retry_at = Some(Instant::now() + pause);
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
                last = Some(e);
            }
            other => last = Some(other),
        }
    }
    loop {
        let hedge_due = sent < latency.max_sends && next_hedge < deadline && retry_at.is_none();
        tokio::select! {
            Some((reply, sent_at)) = pending.next() => match reply {
                Ok(msg) => {
                    latency.observe(sent_at.elapsed());
                    return (Ok(msg), copies);
                }
                // An error reply is an answer.
                Err(e @ ClientError::Remote(_)) => return (Err(e), copies),
                // Our own connection dropped: a hookpoint wants to know at once; a dispatcher
                // reconnects in a fraction of its budget and asks again, rather than decide
                // from calls its own outage cut (a node lost under it).
                Err(e @ ClientError::Disconnected { .. }) if !latency.wait_reconnect => return (Err(e), copies),
                Err(e @ (ClientError::NoResponders { .. } | ClientError::Disconnected { .. })) => {
                    last = Some(e);
                    if pending.is_empty() && Instant::now() + pause < deadline {
                        retry_at = Some(Instant::now() + pause);
                        pause = (pause * 2).min(Duration::from_millis(50));
                    }
                }
                Err(e) => {
                    last = Some(e);
                    if pending.is_empty() && !hedge_due && retry_at.is_none() {
                        break;
                    }
                }
            },
            _ = tokio::time::sleep_until(next_hedge), if hedge_due => {
                next_hedge += delay;
                if !latency.spend() {
                    tracing::debug!(subject, sent, "no answer yet, but the hedge budget is spent");
                    continue;
                }
                tracing::debug!(subject, sent, after = ?start.elapsed(), "no answer yet: hedging");
                pending.push(send(deadline - Instant::now()));
                sent += 1;
                copies += 1;
            }
            _ = tokio::time::sleep_until(retry_at.unwrap_or(deadline)), if retry_at.is_some() => {
                retry_at = None;
                pending.push(send(deadline - Instant::now()));
                copies += 1;
            }
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    let failure = match last {
        Some(e @ ClientError::NoResponders { .. }) => e,
        // A dropped copy is no answer: with none left, the call timed out.
        Some(e)
            if !matches!(e, ClientError::Timeout { .. } | ClientError::Dropped { .. })
                && Instant::now() < deadline =>
        {
            e
        }
        _ => ClientError::Timeout {
            subject: subject.to_string(),
            timeout,
        },
    };
    (Err(failure), copies)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hedges_are_earned_by_calls_and_saved_up_to_a_burst() {
        let l = Latency::default();
        for _ in 0..HEDGE_BURST {
            assert!(l.spend());
        }
        assert!(!l.spend(), "the burst is spent");
        l.earn();
        l.earn();
        assert!(
            l.spend() && l.spend() && !l.spend(),
            "two calls, two hedges"
        );
        for _ in 0..HEDGE_BURST * 2 {
            l.earn();
        }
        assert_eq!(l.budget.load(Ordering::Relaxed), HEDGE_BURST);
    }

    #[test]
    fn the_hedge_delay_follows_the_latency_and_every_copy_fits_the_timeout() {
        let l = Latency::default();
        let timeout = Duration::from_secs(1);
        assert_eq!(l.hedge_delay(timeout), FIRST_DELAY);
        for _ in 0..50 {
            l.observe(Duration::from_micros(300));
        }
        assert_eq!(l.hedge_delay(timeout), MIN_DELAY);
        for _ in 0..50 {
            l.observe(Duration::from_millis(10));
        }
        let d = l.hedge_delay(timeout);
        assert!(
            d > Duration::from_millis(35) && d <= Duration::from_millis(40),
            "{d:?}"
        );
        // Slower than the timeout allows: every copy still fits in it.
        for _ in 0..50 {
            l.observe(Duration::from_millis(200));
        }
        assert_eq!(l.hedge_delay(timeout), timeout / MAX_SENDS);
        // A hookpoint's: never sooner than its floor.
        let gw = Latency::new(Duration::from_millis(100), 3);
        gw.observe(Duration::from_millis(1));
        assert_eq!(
            gw.hedge_delay(Duration::from_secs(5)),
            Duration::from_millis(100)
        );
    }
}
