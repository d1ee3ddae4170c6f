//! conn-limit's one rule, and the only code that keeps it:
//!
//! **Taking a slot is idempotent per (policy, connection).** Any number of copies of an
//! admission (hedged calls of one run, runs of one event on several dispatchers), on any
//! instance, hold at most one slot per policy: the slot's value lists the runs holding it.
//! Only three things give a slot back: the connection's close (the whole slot), the undo of a
//! denied run (that run; the slot goes when no run is left), and the lease (the store drops a
//! slot not written for that long). A copy that refuses gives nothing back: another copy of
//! its run may have admitted, and that answer may be the one the gateway got; if the event
//! ends denied, the run's undo frees what it holds.
//!
//! The store enforces the limit and decides every race (see [`super::conn_store`]): a new slot
//! is written only if none exists and fewer than the limit do, anything else only over the
//! revision read. What it cannot see is a copy that writes *after* the close or the undo of
//! its connection: so both first set a marker, then free, and every write that adds a run is
//! then confirmed ([`Slots::confirm`]): the connection's markers are read, and what the write
//! added is given back at once if they concern it. Either the write came before the free (and
//! is freed by it) or after the marker (and gives itself back).
//!
//! The confirmation runs after the copy has answered, off the decision's path: once its
//! connection is closed or its run undone, what a copy answers is used by no one (the gateway
//! gave the connection up, or the dispatcher decided the event without it); only what it holds
//! matters.
//!
//! Timing rule: a marker counts for [`bus::slots::MARKER_FOR`], which must exceed
//! [`MAX_CALL`], the longest between a copy being sent and its confirmation's marker read, so
//! no copy sent before a marker writes and confirms after it stops counting (checked below, at
//! compile time).

use std::time::{Duration, Instant};

use super::conn_store::{Marker, SlotStore, StoreError, Written};

/// How long one admission may go on writing once started: past it, it fails instead of
/// writing (a store slow enough to need more is failing anyway).
pub const ADMIT_FOR: Duration = Duration::from_secs(10);
/// The last write of an admission may itself take a request's timeout; so may the
/// confirmation's marker read, which is given up past it (and handed to [`Slots::settle`]).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest between a copy being sent and its confirmation's marker read: the runtime
/// starts no request past its `Policy-Deadline` (at most `MAX_TIMEOUT_MS` after it was sent),
/// a started admission writes for [`ADMIT_FOR`] at most, plus its last request, and is
/// confirmed at once, within a request's timeout.
pub const MAX_CALL: Duration = Duration::from_millis(
    bus::admin::MAX_TIMEOUT_MS
        + ADMIT_FOR.as_millis() as u64
        + 2 * REQUEST_TIMEOUT.as_millis() as u64,
);
const _: () = assert!(bus::slots::MARKER_FOR.as_millis() > MAX_CALL.as_millis());

/// How often [`Slots::settle`] looks again.
const SETTLE_EVERY: Duration = Duration::from_secs(5);
/// Conditional writes of one slot before giving up: only copies of one connection's
/// admission (and its close, undo or renewal) write the same slot, so a few suffice.
const ATTEMPTS: usize = 16;
/// Runs a slot lists at most: one per dispatcher run of the event (a hookpoint sends three
/// copies at most). Past it, an admission fails (closed) rather than hold the slot unlisted,
/// which the listed runs' undos would free under it.
const MAX_RUNS: usize = 8;

/// What an admission under one policy came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// This copy wrote the slot (new, or its run added): to be confirmed.
    Took,
    /// Another copy of the run holds it already: nothing written.
    Held,
    /// Every slot is taken.
    Full,
}

pub struct Slots<S> {
    pub store: S,
}

impl<S: SlotStore> Slots<S> {
    pub fn new(store: S) -> Self {
        Slots { store }
    }

    /// Takes (or shares) the connection's slot of `policy` for `run`.
    pub async fn admit(
        &self,
        policy: &str,
        max: u32,
        connection: &str,
        run: &str,
    ) -> Result<Admission, StoreError> {
        let until = Instant::now() + ADMIT_FOR;
        self.store.prepare(policy, max).await?;
        // A new connection is the usual case: write first, read only if the slot exists.
        let (mut runs, mut expected) = (vec![run.to_string()], 0);
        for _ in 0..ATTEMPTS {
            if Instant::now() >= until {
                return Err(format!(
                    "the slot of {connection} under {policy}: no write within {ADMIT_FOR:?}"
                ));
            }
            let written = self.store.put(policy, connection, &runs, expected).await?;
            if written == Written::Yes {
                return Ok(Admission::Took);
            }
            match self.store.get(policy, connection).await? {
                Some(slot) if slot.runs.iter().any(|r| r == run) => return Ok(Admission::Held),
                Some(slot) if slot.runs.len() >= MAX_RUNS => {
                    return Err(format!(
                        "the slot of {connection} under {policy} lists {MAX_RUNS} runs already"
                    ))
                }
                Some(slot) => {
                    runs = slot.runs;
                    runs.push(run.to_string());
                    expected = slot.revision;
                }
                // Full, and this connection holds no slot.
                None if written == Written::Full => return Ok(Admission::Full),
                None => (runs, expected) = (vec![run.to_string()], 0),
            }
        }
        Err(format!(
            "the slot of {connection} under {policy} is too contended"
        ))
    }

    /// After admissions that [`Admission::Took`] under `policies`: gives back what they wrote
    /// if the connection was closed or the run undone meanwhile (see the module's rule), with
    /// one marker read. `true`: given back.
    pub async fn confirm(
        &self,
        connection: &str,
        run: &str,
        policies: &[impl AsRef<str>],
    ) -> Result<bool, StoreError> {
        let marked = tokio::time::timeout(REQUEST_TIMEOUT, self.store.marked(connection, run))
            .await
            .map_err(|_| {
                format!("the markers of {connection}: no answer in {REQUEST_TIMEOUT:?}")
            })??;
        if !marked {
            return Ok(false);
        }
        tracing::debug!(%connection, %run, "admitted after its close or undo: given back");
        for policy in policies {
            self.leave(policy.as_ref(), connection, Some(run)).await?;
        }
        Ok(true)
    }

    /// Takes `run` out of the connection's slot (every run, with `None`); the slot goes when
    /// none is left.
    async fn leave(
        &self,
        policy: &str,
        connection: &str,
        run: Option<&str>,
    ) -> Result<(), StoreError> {
        for _ in 0..ATTEMPTS {
            let Some(slot) = self.store.get(policy, connection).await? else {
                return Ok(());
            };
            let rest: Vec<String> = match run {
                Some(run) if !slot.runs.iter().any(|r| r == run) => return Ok(()),
                Some(run) => slot.runs.iter().filter(|r| *r != run).cloned().collect(),
                None => Vec::new(),
            };
            let written = if rest.is_empty() {
                self.store.remove(policy, connection, slot.revision).await?
            } else {
                self.store
                    .put(policy, connection, &rest, slot.revision)
                    .await?
            };
            if written == Written::Yes {
                return Ok(());
            }
        }
        Err(format!(
            "the slot of {connection} under {policy} is too contended"
        ))
    }

    /// After an admission whose write has an unknown outcome (no acknowledgement: the server
    /// went away): the client may still send that write once it reconnects, after the run's
    /// undo (or the connection's close) has already freed what there was. So for
    /// [`MAX_CALL`], every [`SETTLE_EVERY`], once the connection is closed or the run undone,
    /// the run is taken out of the slot again.
    pub async fn settle(&self, policy: &str, connection: &str, run: &str) {
        let until = tokio::time::Instant::now() + MAX_CALL;
        while tokio::time::Instant::now() < until {
            tokio::time::sleep(SETTLE_EVERY).await;
            if let Ok(true) = self.store.marked(connection, run).await {
                if let Err(e) = self.leave(policy, connection, Some(run)).await {
                    tracing::debug!(%policy, %connection, error = %e, "a write of unknown outcome not given back yet");
                }
            }
        }
    }

    /// The connection is closed: every slot it holds under `policies` is freed, and a copy of
    /// its admission still under way gives back what it writes.
    pub async fn close(&self, connection: &str, policies: &[&str]) -> Result<(), StoreError> {
        self.store.mark(Marker::Closed(connection)).await?;
        // Every policy, even after one failed: the close is sent again, and frees fewer then.
        let mut failed = Ok(());
        for policy in policies {
            if let Err(e) = self.leave(policy, connection, None).await {
                failed = Err(e);
            }
        }
        failed
    }

    /// The run's event was denied: the run leaves the connection's slots under `policies`, and
    /// a copy of it still under way gives back what it writes.
    pub async fn undo(
        &self,
        connection: &str,
        run: &str,
        policies: &[&str],
    ) -> Result<(), StoreError> {
        self.store.mark(Marker::Undone(connection, run)).await?;
        for policy in policies {
            self.leave(policy, connection, Some(run)).await?;
        }
        Ok(())
    }

    /// The connection reports itself open: its slots are written again, so the lease counts
    /// from now. Slots that changed meanwhile were just written anyway.
    pub async fn renew(&self, connection: &str, policies: &[&str]) -> Result<usize, StoreError> {
        let mut renewed = 0;
        for policy in policies {
            if let Some(slot) = self.store.get(policy, connection).await? {
                let written = self
                    .store
                    .put(policy, connection, &slot.runs, slot.revision)
                    .await?;
                renewed += usize::from(written == Written::Yes);
            }
        }
        Ok(renewed)
    }
}

#[cfg(test)]
#[path = "conn_slots_tests.rs"]
mod tests;
