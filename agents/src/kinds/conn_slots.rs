//! The connection limiter's slots: the shared store (one key per slot, created atomically),
//! this instance's view of it (kept by a watch), and the operations on both: take, release,
//! renew, undo.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;

/// Create attempts for one admission before it is denied as contended.
const ATTEMPTS: usize = 8;
/// How long a close waits for the bucket, and for the view to catch up with it.
const CATCH_UP: Duration = Duration::from_secs(1);

pub(crate) use super::conn_view::slot_key;
use super::conn_view::{SlotRef, Taken, View, GONE_PREFIX, RELEASED_FOR};

/// The shared slot store and this instance's view of it.
pub(crate) struct Slots {
    pub(crate) store: kv::Store,
    lease: Duration,
    pub(crate) view: Mutex<View>,
    /// Holders whose event was denied in the end, with when this instance heard: an admission
    /// of theirs still in progress here (a late or duplicate request) gives its slots back.
    undone: Mutex<HashMap<String, Instant>>,
    /// The bucket revision the watch has applied to `view`: a close waits for it to pass the
    /// bucket's last revision, so it frees slots other instances took a moment ago too.
    applied: tokio::sync::watch::Sender<u64>,
}

/// How long an undone holder is remembered: longer than any subscription timeout.
const UNDONE_FOR: Duration = Duration::from_secs(120);

impl Slots {
    pub(crate) fn new(store: kv::Store, lease: Duration) -> Self {
        Slots {
            store,
            lease,
            view: Mutex::new(View::default()),
            undone: Mutex::new(HashMap::new()),
            applied: tokio::sync::watch::Sender::new(0),
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
    async fn applied_up_to(&self, revision: u64) -> Result<(), String> {
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

    /// Gives back every slot `holder` holds that this instance knows of, and remembers the
    /// holder so that an admission of it still in progress here gives its slots back too.
    pub(crate) async fn undo(self: &Arc<Self>, holder: &str) {
        {
            let mut undone = self.undone.lock().unwrap_or_else(|e| e.into_inner());
            undone.retain(|_, at| at.elapsed() < UNDONE_FOR);
            undone.insert(holder.to_string(), Instant::now());
        }
        // The run's slot was taken before its decision, perhaps by another instance: look
        // once the view has caught up.
        if let Err(e) = self.caught_up().await {
            tracing::debug!(%holder, error = %e, "undo with a view behind the bucket");
        }
        let held = self.view().held_as(holder);
        tracing::debug!(%holder, held = held.len(), "undo");
        if let Err(e) = self.release_exact(&held).await {
            tracing::debug!(%holder, error = %e, "could not give back an undone admission's slots yet");
            self.give_back(held);
        }
    }

    pub(crate) fn is_undone(&self, holder: &str) -> bool {
        self.undone
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(holder)
    }

    pub(crate) fn view(&self) -> std::sync::MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes one slot of the policy for `holder` (`<connection>#<run>`).
    /// Frees `slots` (if they still hold their holders) in the background, asking again
    /// until it succeeds, for up to [`RELEASED_FOR`]: for a create whose outcome is unknown
    /// (the store failed to answer: it may have been written) and a release that failed.
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

    pub(crate) async fn take(
        self: &Arc<Self>,
        policy: &str,
        max: u32,
        holder: &str,
        start: u32,
    ) -> Result<Taken, String> {
        // The same request twice (a hedge) on this instance: the same slot.
        if let Some((n, revision)) = self.view().slot_of(policy, holder) {
            return Ok(Taken::Slot(n, revision));
        }
        let mut tried = Vec::new();
        for _ in 0..ATTEMPTS {
            let next = {
                let view = self.view();
                if view.in_use(policy) >= max as usize {
                    view.expired_slot(policy, max, self.lease)
                        .filter(|n| !tried.contains(n))
                } else {
                    view.free_slot(policy, max, start, &tried).or_else(|| {
                        view.expired_slot(policy, max, self.lease)
                            .filter(|n| !tried.contains(n))
                    })
                }
            };
            let Some(n) = next else {
                return Ok(Taken::Full);
            };
            tried.push(n);
            let key = slot_key(policy, n);
            match self
                .store
                .create(&key, bytes::Bytes::copy_from_slice(holder.as_bytes()))
                .await
            {
                Ok(revision) => {
                    tracing::debug!(%key, %holder, revision, "slot taken");
                    self.view().apply(&key, Some(holder.to_string()), revision);
                    return self.after_create(&key, n, holder, revision).await;
                }
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                    // A hedged copy of this request, on another instance, may have taken it
                    // first (copies start at the same slot): then it is this admission's.
                    if let Ok(Some(e)) = self.store.entry(&key).await {
                        if e.operation == kv::Operation::Put
                            && e.value.as_ref() == holder.as_bytes()
                        {
                            self.view()
                                .apply(&key, Some(holder.to_string()), e.revision);
                            return Ok(Taken::Slot(n, e.revision));
                        }
                    }
                    self.view().mark_taken(&key)
                }
                Err(e) => {
                    // Maybe written, maybe not: if it was, it is this admission's, which is
                    // refused, so it goes back once the store answers.
                    self.give_back(vec![SlotRef {
                        key,
                        holder: holder.to_string(),
                        revision: 0,
                    }]);
                    return Err(e.to_string());
                }
            }
        }
        Ok(Taken::Full)
    }

    /// A copy of an admission (another dispatcher's run of a hedged event, or a late agent
    /// call) can create its slot after the connection was closed or its event denied: a close
    /// cannot free a slot that does not exist yet. So once the view has the new slot, an
    /// admission checks whether a slot of the same connection was freed before it, and if
    /// so gives its own back. Every slot then is either created before the close's second
    /// look at the bucket (and freed by it) or after the close's first delete (and given back
    /// here).
    async fn after_create(
        &self,
        key: &str,
        n: u32,
        holder: &str,
        revision: u64,
    ) -> Result<Taken, String> {
        if let Err(e) = self.applied_up_to(revision).await {
            tracing::debug!(%key, error = %e, "could not check the new slot against releases");
            return Ok(Taken::Slot(n, revision));
        }
        let token = holder.split_once('#').map_or(holder, |(t, _)| t);
        if !self.view().released_before(token, revision) {
            return Ok(Taken::Slot(n, revision));
        }
        tracing::debug!(%key, %holder, "the connection was released before this admission took its slot: given back");
        self.release_exact(&[SlotRef {
            key: key.to_string(),
            holder: holder.to_string(),
            revision,
        }])
        .await?;
        Ok(Taken::Released)
    }

    /// Frees the given slots if they still hold their holders (after a lease a slot may belong
    /// to another connection, and a reused connection id to another admission). A slot whose
    /// revision is known is deleted expecting it, without a read; only if that fails (the slot
    /// changed: renewed, freed, taken again) is it read, and deleted again if it still holds the
    /// holder. Fails if a slot could not be read, or still holds its holder after the delete.
    pub(crate) async fn release_exact(&self, slots: &[SlotRef]) -> Result<(), String> {
        let mut failed = None;
        for slot in slots {
            if let Err(e) = self.release_one(slot).await {
                failed = Some(e);
            }
        }
        failed.map_or(Ok(()), Err)
    }

    async fn release_one(&self, slot: &SlotRef) -> Result<(), String> {
        let mut revision = slot.revision;
        let mut last_error = String::new();
        for _ in 0..2 {
            if revision == 0 {
                match self.held_at(slot).await? {
                    Some(r) => revision = r,
                    None => return Ok(()),
                }
            }
            match self
                .store
                .delete_expect_revision(&slot.key, Some(revision))
                .await
            {
                // The view learns of it from the watch, with its revision (see `released`).
                Ok(()) => {
                    tracing::debug!(key = %slot.key, holder = %slot.holder, "slot freed");
                    return Ok(());
                }
                Err(err) => {
                    last_error = err.to_string();
                    revision = 0;
                }
            }
        }
        // Two deletes failed: fine if the slot no longer holds the holder.
        match self.held_at(slot).await? {
            None => Ok(()),
            Some(_) => Err(format!("could not free {}: {last_error}", slot.key)),
        }
    }

    /// The revision at which the slot holds its holder now, or `None` when it does not.
    async fn held_at(&self, slot: &SlotRef) -> Result<Option<u64>, String> {
        match self.store.entry(&slot.key).await {
            Ok(Some(e))
                if e.operation == kv::Operation::Put
                    && e.value.as_ref() == slot.holder.as_bytes() =>
            {
                Ok(Some(e.revision))
            }
            Ok(_) => Ok(None),
            Err(err) => Err(format!("could not read {}: {err}", slot.key)),
        }
    }

    /// Renews every slot a connection holds: writing the same holder again restarts the
    /// bucket's `max_age`, so a connection that reports itself open outlives the lease. A
    /// failed renewal (the slot changed, the bucket is away) is left to the next report.
    pub(crate) async fn renew_connection(&self, token: &str) -> usize {
        let held = self.view().held_by(token);
        let mut renewed = 0;
        for SlotRef { key, holder, .. } in held {
            let Ok(Some(e)) = self.store.entry(&key).await else {
                continue;
            };
            if e.operation != kv::Operation::Put || e.value.as_ref() != holder.as_bytes() {
                continue;
            }
            match self.store.update(&key, e.value.clone(), e.revision).await {
                Ok(_) => renewed += 1,
                Err(err) => tracing::debug!(%key, error = %err, "slot changed before renewal"),
            }
        }
        renewed
    }

    /// Frees every slot a connection holds, wherever it was admitted: once the view has caught
    /// up with the bucket, so a slot taken by another instance a moment ago is freed too; then
    /// once more after a second catch-up, for a slot created while the first pass ran (a later
    /// one is given back by its admission, see `after_create`). The close is confirmed only
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
                self.store
                    .put(format!("{GONE_PREFIX}{token}"), bytes::Bytes::new())
                    .await
                    .map_err(|e| format!("could not record the close: {e}"))?;
            }
            return Ok(());
        }
        let released = self.release_exact(&held).await;
        caught_up.and(released)?;
        let caught_up = self.caught_up().await;
        let late: Vec<_> = self
            .view()
            .held_by(token)
            .into_iter()
            .filter(|slot| !held.contains(slot))
            .collect();
        let released = self.release_exact(&late).await;
        caught_up.and(released)
    }
}
