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
/// The key a close writes when it found no slot of a connection a limit may apply to
/// (`slot._gone.<connection>`): every instance's watch then records the release, and an
/// admission of the connection still under way gives its slot back. Policy ids never start
/// with `_`, so it is no slot.
const GONE_PREFIX: &str = "slot._gone.";
/// How long a connection's release is remembered: longer than the longest agent call
/// (`MAX_TIMEOUT_MS`) plus a KV request, so no copy of its admission can still be under way.
const RELEASED_FOR: Duration = Duration::from_secs(65);

/// A slot as this instance knows it: who holds it (`<connection>#<nonce>`, empty when only
/// a failed create told us it is taken) and since when this instance has seen it held.
#[derive(Debug, Clone)]
pub(crate) struct Held {
    holder: String,
    seen: Instant,
}

/// What this instance knows of the slots. Only a hint: the atomic create decides.
#[derive(Default)]
pub(crate) struct View {
    /// policy id -> slot number -> holder
    slots: HashMap<String, HashMap<u32, Held>>,
    /// connection token -> the first revision at which one of its slots was freed (closed,
    /// undone, refused), for [`RELEASED_FOR`]: a copy of its admission that creates a slot
    /// after that revision gives it back.
    released: HashMap<String, (u64, Instant)>,
    /// `released` is pruned when it grows past this.
    prune_at: usize,
}

/// What an admission came to.
pub(crate) enum Taken {
    Slot(u32),
    /// Every slot is taken.
    Full,
    /// A slot was taken, but the connection's slots had been freed before (closed, or its
    /// event denied, while this copy of the admission was under way): it was given back.
    Released,
}

impl View {
    /// Forgets the slots (before a reload), keeping what was released.
    pub(crate) fn clear_slots(&mut self) {
        self.slots.clear();
    }

    /// A change the watch read at `revision`.
    pub(crate) fn apply_at(&mut self, key: &str, holder: Option<String>, revision: u64) {
        if let Some(token) = key.strip_prefix(GONE_PREFIX) {
            if holder.is_some() {
                self.record_release(token, revision);
            }
            return;
        }
        if holder.is_none() {
            // Who held it, before it goes from the view.
            let freed = parse_slot(key)
                .and_then(|(policy, n)| self.slots.get(policy)?.get(&n))
                .and_then(|h| h.holder.split_once('#'))
                .map(|(token, _)| token.to_string());
            if let Some(token) = freed {
                self.record_release(&token, revision);
            }
        }
        self.apply(key, holder);
    }

    fn record_release(&mut self, token: &str, revision: u64) {
        self.released
            .entry(token.to_string())
            .or_insert((revision, Instant::now()));
        if self.released.len() > self.prune_at.max(1024) {
            self.released
                .retain(|_, (_, at)| at.elapsed() < RELEASED_FOR);
            self.prune_at = self.released.len() * 2;
        }
    }

    /// Whether a slot of the connection was freed before `revision`.
    fn released_before(&self, token: &str, revision: u64) -> bool {
        self.released
            .get(token)
            .is_some_and(|(r, at)| *r < revision && at.elapsed() < RELEASED_FOR)
    }

    pub(crate) fn apply(&mut self, key: &str, holder: Option<String>) {
        let Some((policy, n)) = parse_slot(key) else {
            return;
        };
        match holder {
            Some(h) => {
                let slots = self.slots.entry(policy.to_string()).or_default();
                // A failed create says "taken" but not by whom: keep a known holder.
                if h.is_empty() && slots.contains_key(&n) {
                    return;
                }
                slots.insert(
                    n,
                    Held {
                        holder: h,
                        seen: Instant::now(),
                    },
                );
            }
            None => {
                if let Some(m) = self.slots.get_mut(policy) {
                    m.remove(&n);
                }
            }
        }
    }

    /// A failed create: the slot is held (by whom the watch will say), seen held from now on so
    /// it is not probed again before a lease.
    fn mark_taken(&mut self, key: &str) {
        let Some((policy, n)) = parse_slot(key) else {
            return;
        };
        let held = self
            .slots
            .entry(policy.to_string())
            .or_default()
            .entry(n)
            .or_insert(Held {
                holder: String::new(),
                seen: Instant::now(),
            });
        held.seen = Instant::now();
    }

    /// A slot below `max` that looks free, starting from `start` so instances spread out.
    fn free_slot(&self, policy: &str, max: u32, start: u32, tried: &[u32]) -> Option<u32> {
        let taken = self.slots.get(policy);
        (0..max)
            .map(|i| (start + i) % max)
            .find(|n| !tried.contains(n) && !taken.is_some_and(|t| t.contains_key(n)))
    }

    /// The slot held longest, if it has been held past the lease (JetStream may have dropped
    /// it: the watch does not report expiries).
    fn expired_slot(&self, policy: &str, max: u32, lease: Duration) -> Option<u32> {
        self.slots
            .get(policy)?
            .iter()
            .filter(|(n, h)| **n < max && h.seen.elapsed() >= lease)
            .min_by_key(|(_, h)| h.seen)
            .map(|(n, _)| *n)
    }

    /// Slots of the policy this instance knows to be held, above the limit too (after the
    /// limit was lowered they still count).
    pub(crate) fn in_use(&self, policy: &str) -> usize {
        self.slots.get(policy).map_or(0, HashMap::len)
    }

    /// The slot of `policy` that `holder` holds, if this instance has seen it.
    fn slot_of(&self, policy: &str, holder: &str) -> Option<u32> {
        self.slots
            .get(policy)?
            .iter()
            .find(|(_, h)| h.holder == holder)
            .map(|(n, _)| *n)
    }

    /// The slots held by exactly `holder`.
    fn held_as(&self, holder: &str) -> Vec<(String, String)> {
        self.slots
            .iter()
            .flat_map(|(p, m)| {
                m.iter()
                    .filter(|(_, h)| h.holder == holder)
                    .map(move |(n, h)| (slot_key(p, *n), h.holder.clone()))
            })
            .collect()
    }

    /// The slots a connection holds, by its token.
    pub(crate) fn held_by(&self, token: &str) -> Vec<(String, String)> {
        let prefix = format!("{token}#");
        self.slots
            .iter()
            .flat_map(|(p, m)| {
                m.iter()
                    .filter(|(_, h)| h.holder.starts_with(&prefix))
                    .map(move |(n, h)| (slot_key(p, *n), h.holder.clone()))
            })
            .collect()
    }
}

pub(crate) fn slot_key(policy: &str, n: u32) -> String {
    format!("slot.{policy}.{n}")
}

fn parse_slot(key: &str) -> Option<(&str, u32)> {
    let rest = key.strip_prefix("slot.")?;
    let (policy, n) = rest.rsplit_once('.')?;
    if policy.starts_with('_') {
        return None;
    }
    Some((policy, n.parse().ok()?))
}

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
    pub(crate) fn give_back(self: &Arc<Self>, slots: Vec<(String, String)>) {
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
        if let Some(n) = self.view().slot_of(policy, holder) {
            return Ok(Taken::Slot(n));
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
                    self.view().apply(&key, Some(holder.to_string()));
                    return self.after_create(&key, n, holder, revision).await;
                }
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                    // A hedged copy of this request, on another instance, may have taken it
                    // first (copies start at the same slot): then it is this admission's.
                    if let Ok(Some(e)) = self.store.entry(&key).await {
                        if e.operation == kv::Operation::Put
                            && e.value.as_ref() == holder.as_bytes()
                        {
                            self.view().apply(&key, Some(holder.to_string()));
                            return Ok(Taken::Slot(n));
                        }
                    }
                    self.view().mark_taken(&key)
                }
                Err(e) => {
                    // Maybe written, maybe not: if it was, it is this admission's, which is
                    // refused, so it goes back once the store answers.
                    self.give_back(vec![(key, holder.to_string())]);
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
            return Ok(Taken::Slot(n));
        }
        let token = holder.split_once('#').map_or(holder, |(t, _)| t);
        if !self.view().released_before(token, revision) {
            return Ok(Taken::Slot(n));
        }
        tracing::debug!(%key, %holder, "the connection was released before this admission took its slot: given back");
        self.release_exact(&[(key.to_string(), holder.to_string())])
            .await?;
        Ok(Taken::Released)
    }

    /// Frees the given slots if they still hold `holder` (after a lease a slot may belong to
    /// another connection, and a reused connection id to another admission). Fails if a slot
    /// could not be read, or still holds `holder` after the delete failed.
    pub(crate) async fn release_exact(&self, slots: &[(String, String)]) -> Result<(), String> {
        let mut failed = None;
        for (key, holder) in slots {
            let e = match self.store.entry(key).await {
                Ok(Some(e)) => e,
                Ok(None) => continue,
                Err(err) => {
                    failed = Some(format!("could not read {key}: {err}"));
                    continue;
                }
            };
            if e.operation != kv::Operation::Put || e.value.as_ref() != holder.as_bytes() {
                continue;
            }
            match self
                .store
                .delete_expect_revision(key, Some(e.revision))
                .await
            {
                // The view learns of it from the watch, with its revision (see `released`).
                Ok(()) => tracing::debug!(%key, %holder, "slot freed"),
                Err(err) => {
                    // Changed since it was read (freed by another instance, renewed): fine,
                    // unless it still holds this holder.
                    let still = matches!(self.store.entry(key).await,
                        Ok(Some(now)) if now.operation == kv::Operation::Put && now.value.as_ref() == holder.as_bytes());
                    if still {
                        failed = Some(format!("could not free {key}: {err}"));
                    }
                }
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Renews every slot a connection holds: writing the same holder again restarts the
    /// bucket's `max_age`, so a connection that reports itself open outlives the lease. A
    /// failed renewal (the slot changed, the bucket is away) is left to the next report.
    pub(crate) async fn renew_connection(&self, token: &str) -> usize {
        let held = self.view().held_by(token);
        let mut renewed = 0;
        for (key, holder) in held {
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
