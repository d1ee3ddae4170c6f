//! The connection limiter's slots: the shared store (blocks of slots, each written by
//! compare-and-set), this instance's view of it (kept by a watch), and the operations on both:
//! take, release, renew, undo.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;

/// Lost writes of one batch (or one release) before it is given up as contended.
const ATTEMPTS: usize = 8;
/// How long a close waits for the bucket, and for the view to catch up with it.
const CATCH_UP: Duration = Duration::from_secs(1);

use super::conn_admit::Queue;
use super::conn_block::{self, Block};
pub(crate) use super::conn_view::slot_key;
use super::conn_view::{gone_key, policy_of, undone_key, Seen, SlotRef, View, RELEASED_FOR};

/// The shared slot store and this instance's view of it.
pub(crate) struct Slots {
    pub(crate) store: kv::Store,
    pub(super) lease: Duration,
    pub(crate) view: Mutex<View>,
    /// The bucket revision the watch has applied to `view`: a close waits for it to pass the
    /// bucket's last revision, so it frees slots other instances took a moment ago too.
    applied: tokio::sync::watch::Sender<u64>,
    /// Admissions waiting for this instance's next write, per policy.
    pub(super) queues: Mutex<HashMap<String, Queue>>,
    /// The block this instance looks for room from: instances start apart, so their writes
    /// rarely meet on one block, and one instance's admissions gather in one block.
    pub(super) start: u32,
}

/// What the final decision says of this kind's call, for an undo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Called {
    /// It answered with the slots it took: the copy that answered has finished.
    Took,
    /// It failed (no answer in time, an error): a copy may still be under way, anywhere.
    Failed,
    /// It refused, and the call was hedged: another copy may have admitted.
    Refused,
    /// It answered and took nothing (no limit applied): no copy takes anything either.
    Nothing,
}

impl Slots {
    pub(crate) fn new(store: kv::Store, lease: Duration) -> Self {
        Slots {
            store,
            lease,
            view: Mutex::new(View::default()),
            applied: tokio::sync::watch::Sender::new(0),
            queues: Mutex::new(HashMap::new()),
            start: rand::random(),
        }
    }

    /// The watch has applied the bucket up to `revision` to the view.
    pub(crate) fn applied(&self, revision: u64) {
        self.applied.send_if_modified(|r| {
            let newer = revision > *r;
            *r = (*r).max(revision);
            newer
        });
    }

    /// Waits until the view holds every slot written before this call, wherever it was taken.
    /// Without it, a close that reaches this instance just after another instance (or a hedged
    /// copy) took a slot would miss it, and the slot would stay held until the lease.
    async fn caught_up(&self) -> Result<(), String> {
        let state = tokio::time::timeout(CATCH_UP, bus::config::stream_state(&self.store))
            .await
            .map_err(|_| "the slot bucket did not answer in time".to_string())?
            .map_err(|e| format!("the slot bucket did not answer: {e}"))?;
        // An empty stream has nothing to see (its last revision may have expired, and the
        // watch never sees an expiry; expiry goes oldest first, so if the last went all did).
        if state.messages == 0 {
            return Ok(());
        }
        self.applied_up_to(state.last_sequence).await
    }

    /// Waits until the watch has applied the bucket up to `revision`.
    pub(super) async fn applied_up_to(&self, revision: u64) -> Result<(), String> {
        let mut applied = self.applied.subscribe();
        let waited = tokio::time::timeout(CATCH_UP, applied.wait_for(|r| *r >= revision))
            .await
            .map(|r| r.map(|_| ()));
        match waited {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err("the slot watch stopped".into()),
            Err(_) => Err(format!(
                "this instance's view of the slots is behind the bucket (at revision {}, the bucket at {revision})",
                *self.applied.borrow()
            )),
        }
    }

    /// Gives back every slot the copies of `run` (`<connection>#<run>`) took, on any
    /// instance, including a copy still under way. Confirmed (`Ok`) only once every slot taken
    /// so far is free and any taken later is sure to be given back by its admission;
    /// otherwise the dispatcher asks again.
    ///
    /// - `Took`: the answering copy's slot is in the bucket. Freeing it records a release of
    ///   the connection on every instance's view, so a copy written after gives itself back
    ///   (`after_write`); a second look once the view has caught up again frees a copy
    ///   written in between.
    /// - `Failed`: maybe nothing is freed, so nothing would be recorded: a marker tells every
    ///   instance the run is undone; once this view has it, what was written before it is
    ///   here to free, and what is written after gives itself back.
    /// - `Refused`: under load this is every hedged refusal, so no marker is written: the
    ///   slots of copies written before the view caught up are freed; a copy that writes after
    ///   that keeps its slot until the lease.
    pub(crate) async fn undo(self: &Arc<Self>, run: &str, called: Called) -> Result<(), String> {
        self.view().mark_undone(run);
        match called {
            Called::Nothing => Ok(()),
            Called::Failed => {
                let marker = self
                    .store
                    .put(undone_key(run), bytes::Bytes::new())
                    .await
                    .map_err(|e| format!("could not record the undo: {e}"))?;
                self.applied_up_to(marker).await?;
                let held = self.view().held_as(run);
                tracing::debug!(%run, held = held.len(), "undo of a failed call");
                self.release_exact(&held).await
            }
            Called::Refused => {
                self.caught_up().await?;
                let held = self.view().held_as(run);
                tracing::debug!(%run, held = held.len(), "undo of a hedged refusal");
                self.release_exact(&held).await
            }
            Called::Took => {
                self.caught_up().await?;
                let held = self.view().held_as(run);
                tracing::debug!(%run, held = held.len(), "undo");
                self.release_exact(&held).await?;
                self.caught_up().await?;
                let late = self.view().held_as(run);
                self.release_exact(&late).await
            }
        }
    }

    /// A slot of `policy` that another copy of `run` holds, as this instance's view has it: a
    /// hedge shares it instead of taking another. Safe under one policy only, and only because
    /// no copy gives back a slot while its run may still be allowed: one refused by a later
    /// policy would (so not under several), and one that cannot check its write, or does not
    /// know whether its write landed, keeps the slot and answers an error, leaving it to the
    /// undo of a denied event (or to the close of an allowed one).
    ///
    /// The view is brought up to date first, so a slot the run's undo (or the connection's
    /// close) freed a moment ago elsewhere is not shared: the copy then takes its own, and
    /// gives it back as any late copy does.
    pub(crate) async fn shared(&self, policy: &str, run: &str) -> Option<SlotRef> {
        let find = || {
            self.view()
                .held_as(run)
                .into_iter()
                .find(|s| policy_of(&s.key) == Some(policy))
        };
        find()?;
        self.caught_up().await.ok()?;
        find()
    }

    pub(crate) fn is_undone(&self, holder: &str) -> bool {
        self.view().is_undone(holder)
    }

    /// Gives back, a while from now, holders the watch saw admitted after their connection
    /// was released or their run undone. Their admission gives them back itself, at once;
    /// this is for an instance that died between its write and that check.
    pub(crate) fn give_back_late(self: &Arc<Self>, late: Vec<SlotRef>) {
        if late.is_empty() {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(CATCH_UP * 2).await;
            tracing::debug!(?late, "slots taken after their release: given back");
            this.give_back(late);
        });
    }

    pub(crate) fn view(&self) -> std::sync::MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Frees `slots` (if they still hold their holders) in the background, asking again
    /// until it succeeds, for up to [`RELEASED_FOR`]: for a write whose outcome is unknown
    /// (the store failed to answer: it may have landed) and a release that failed.
    pub(crate) fn give_back(self: &Arc<Self>, slots: Vec<SlotRef>) {
        let this = self.clone();
        tokio::spawn(async move {
            let until = Instant::now() + RELEASED_FOR;
            loop {
                match this.release_exact(&slots).await {
                    Ok(()) => return,
                    Err(e) if Instant::now() >= until => {
                        tracing::warn!(error = %e, ?slots, "could not give back slots; the lease will");
                        return;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
                }
            }
        });
    }

    pub(super) fn lease_ms(&self) -> u64 {
        self.lease.as_millis() as u64
    }

    /// Reads a block from the bucket into the view.
    pub(super) async fn read(&self, key: &str) -> Result<Option<Seen>, String> {
        let entry = self
            .store
            .entry(key)
            .await
            .map_err(|e| format!("could not read {key}: {e}"))?;
        let mut view = self.view();
        match entry {
            Some(e) => {
                let value = (e.operation == kv::Operation::Put).then_some(e.value.as_ref());
                view.apply_at(key, value, e.revision);
            }
            // Gone (dropped with the lease): nothing is held there.
            None => view.forget(key),
        }
        Ok(view.block(key).cloned())
    }

    /// Frees the given slots if they still hold their holders (after a lease a slot may belong
    /// to another connection, and a reused connection id to another admission). Each release
    /// is one compare-and-set of the block from the revision the view has, with no read first;
    /// only a write that loses to another one reads the block and tries again. Fails if a
    /// block could not be read, or still holds the holder after [`ATTEMPTS`] tries.
    pub(crate) async fn release_exact(&self, slots: &[SlotRef]) -> Result<(), String> {
        let mut failed = None;
        for slot in slots {
            if let Err(e) = self
                .change(slot, |b| {
                    b.without(&slot.holder, conn_block::now_ms(), self.lease_ms())
                })
                .await
            {
                failed = Some(e);
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Writes `slot`'s block changed by `f`, if it holds the slot's holder.
    async fn change(&self, slot: &SlotRef, f: impl Fn(&Block) -> Block) -> Result<(), String> {
        let mut seen = self.view().block(&slot.key).cloned();
        for _ in 0..ATTEMPTS {
            let s = match seen {
                Some(s) if s.block.holds(&slot.holder) => s,
                // The view may be behind (the slot was taken a moment ago elsewhere): ask.
                _ => match self.read(&slot.key).await? {
                    Some(s) if s.block.holds(&slot.holder) => s,
                    _ => return Ok(()),
                },
            };
            let next = f(&s.block);
            match self
                .store
                .update(&slot.key, next.encode(), s.revision)
                .await
            {
                Ok(rev) => {
                    self.view().wrote(&slot.key, Some(next), rev);
                    tracing::debug!(key = %slot.key, holder = %slot.holder, "slot written");
                    return Ok(());
                }
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    seen = self.read(&slot.key).await?;
                }
                Err(e) => return Err(format!("could not write {}: {e}", slot.key)),
            }
        }
        Err(format!("could not write {}: too contended", slot.key))
    }

    /// Renews every slot a connection holds: its holders' times are set to now, so a
    /// connection that reports itself open outlives the lease. A failed renewal (the bucket is
    /// away) is left to the next report.
    pub(crate) async fn renew_connection(&self, token: &str) -> usize {
        let held = self.view().held_by(token);
        let mut renewed = 0;
        for slot in held {
            match self
                .change(&slot, |b| b.renewed(&slot.holder, conn_block::now_ms()))
                .await
            {
                Ok(()) => renewed += 1,
                Err(err) => tracing::debug!(key = %slot.key, error = %err, "slot not renewed"),
            }
        }
        renewed
    }

    /// Frees every slot a connection holds, wherever it was admitted: once the view has caught
    /// up with the bucket, so a slot taken by another instance a moment ago is freed too; then
    /// once more after a second catch-up, for a slot taken while the first pass ran (a later
    /// one is given back by its admission, see `after_write`). The close is confirmed only
    /// then; if it cannot be, what the view knows is freed anyway and the error makes the
    /// gateway send the close again.
    pub(crate) async fn release_connection(
        &self,
        token: &str,
        limited: bool,
    ) -> Result<(), String> {
        let caught_up = self.caught_up().await;
        let held = self.view().held_by(token);
        tracing::debug!(%token, held = held.len(), caught_up = caught_up.is_ok(), "releasing a connection");
        if held.is_empty() {
            caught_up?;
            if limited {
                // Closed before any admission of it took a slot (its decision was lost, and
                // the gateway cancelled it): tell every instance, so a late one gives it back.
                let gone = self
                    .store
                    .put(gone_key(token), bytes::Bytes::new())
                    .await
                    .map_err(|e| format!("could not record the close: {e}"))?;
                // An admission written between the catch-up and the marker is below it, so it
                // does not give itself back: once the view has the marker, free it here.
                self.applied_up_to(gone).await?;
                let late = self.view().held_by(token);
                self.release_exact(&late).await?;
            }
            return Ok(());
        }
        let released = self.release_exact(&held).await;
        caught_up.and(released)?;
        let caught_up = self.caught_up().await;
        // The first pass's releases are in the view already: what it holds now came since.
        let late = self.view().held_by(token);
        let released = self.release_exact(&late).await;
        caught_up.and(released)
    }
}
