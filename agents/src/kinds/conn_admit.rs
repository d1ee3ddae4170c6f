//! Admissions into the connection limiter's blocks: one writer task per instance and policy
//! puts every admission waiting at that moment into one compare-and-set of a block (see
//! [`super::conn_block`]), and checks each against the releases it may have raced.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_nats::jetstream::kv;

use super::conn_block::{self, Block};
use super::conn_slots::Slots;

/// Lost writes of one batch before the rest are refused as contended. A lost write means
/// another instance admitted into that block, so under a small limit shared by busy
/// instances many are normal; giving up early would deny under the limit.
const BATCH_ATTEMPTS: usize = 64;
use super::conn_view::{policy_of, run_of, slot_key, token_of, SlotRef, Taken};

type Reply = tokio::sync::oneshot::Sender<Result<Taken, String>>;

/// An admission waiting for a write.
struct Waiting {
    holder: String,
    max: u32,
    /// It may share a slot another copy of its run holds (it matched one policy only).
    share: bool,
    reply: Reply,
}

#[derive(Default)]
pub(super) struct Queue {
    waiting: Vec<Waiting>,
    /// A writer task is at work on this policy.
    writing: bool,
    /// The block last written: the next batch looks for room from there, so blocks filled
    /// before are not looked at again until the limit wraps around.
    cursor: Option<u32>,
}

/// Lets a policy's queue be written again if its writer panicked (its waiters' answers are
/// dropped with it: they fail closed).
struct Unstuck<'a>(&'a Mutex<HashMap<String, Queue>>, &'a str);

impl Drop for Unstuck<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut queues = self.0.lock().unwrap_or_else(|e| e.into_inner());
            queues.remove(self.1);
        }
    }
}

fn answer(replies: Vec<Reply>, what: impl Fn() -> Result<Taken, String>) {
    for r in replies {
        let _ = r.send(what());
    }
}

fn answer_all(pending: Vec<(String, Vec<Reply>)>, what: impl Fn() -> Result<Taken, String>) {
    for (_, replies) in pending {
        answer(replies, &what);
    }
}

impl Slots {
    /// Takes one slot of the policy (`max` slots) for `holder` (`<connection>#<run>/<copy>`).
    /// The admission waits for this instance's next write of a block of the policy, which
    /// admits every connection waiting at that moment (see [`super::conn_block`]).
    pub(crate) async fn take(
        self: &Arc<Self>,
        policy: &str,
        max: u32,
        holder: &str,
        share: bool,
    ) -> Result<Taken, String> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let start_writer = {
            let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
            if !queues.contains_key(policy) {
                queues.insert(policy.to_string(), Queue::default());
            }
            let Some(queue) = queues.get_mut(policy) else {
                return Err("no admission queue for the policy".into());
            };
            queue.waiting.push(Waiting {
                holder: holder.to_string(),
                max,
                share,
                reply,
            });
            !std::mem::replace(&mut queue.writing, true)
        };
        if start_writer {
            let (this, policy) = (self.clone(), policy.to_string());
            tokio::spawn(async move { this.write_queue(&policy).await });
        }
        answer
            .await
            .unwrap_or_else(|_| Err("the slot writer stopped".into()))
    }

    /// Writes the policy's waiting admissions, batch after batch, until none wait.
    async fn write_queue(self: Arc<Self>, policy: &str) {
        let _unstuck = Unstuck(&self.queues, policy);
        loop {
            let batch = {
                let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
                let Some(queue) = queues.get_mut(policy) else {
                    return;
                };
                if queue.waiting.is_empty() {
                    queue.writing = false;
                    return;
                }
                std::mem::take(&mut queue.waiting)
            };
            self.admit_batch(policy, batch).await;
        }
    }

    /// Admits a batch: as many as fit into one block, by one compare-and-set of it, then the
    /// rest into the next block with room. A write that loses to another instance reads the
    /// block and tries again; after [`BATCH_ATTEMPTS`] lost writes, or with no room anywhere, the
    /// rest are refused.
    async fn admit_batch(self: &Arc<Self>, policy: &str, batch: Vec<Waiting>) {
        let max = batch.iter().map(|w| w.max).min().unwrap_or(0);
        // One entry per holder (the same request twice waits for the same write).
        let mut pending: Vec<(String, Vec<Reply>)> = Vec::new();
        for w in batch {
            // A hedge of a copy whose write landed while this one waited: the slot is shared
            // (the view is newer than the catch-up `Slots::shared` made before it queued).
            if w.share {
                let held = self.view().held_as(run_of(&w.holder));
                if let Some(slot) = held.into_iter().find(|s| policy_of(&s.key) == Some(policy)) {
                    let _ = w.reply.send(Ok(Taken::Shared(slot)));
                    continue;
                }
            }
            if let Some(p) = pending.iter_mut().find(|(h, _)| *h == w.holder) {
                p.1.push(w.reply);
            } else {
                pending.push((w.holder, vec![w.reply]));
            }
        }
        let mut lost = 0;
        let mut tried: Vec<u32> = Vec::new();
        while !pending.is_empty() {
            let now = conn_block::now_ms();
            let found = {
                let cursor = self.queue_cursor(policy);
                let view = self.view();
                // A lowered limit: holders in blocks above it still count.
                if view.in_use(policy) >= max as usize
                    && view.live_in_use(policy, now, self.lease_ms()) >= max as usize
                {
                    drop(view);
                    answer_all(pending, || Ok(Taken::Full));
                    return;
                }
                let start = cursor.unwrap_or(self.start) % conn_block::blocks(max).max(1);
                view.with_room(policy, max, start, now, self.lease_ms(), &tried)
                    .map(|(b, room)| {
                        let key = slot_key(policy, b);
                        let seen = view.block(&key).cloned();
                        (b, room, key, seen)
                    })
            };
            let Some((b, room, key, seen)) = found else {
                answer_all(pending, || Ok(Taken::Full));
                return;
            };
            let (base, revision) = seen.map_or((Block::default(), 0), |s| (s.block, s.revision));
            let chunk: Vec<(String, Vec<Reply>)> =
                pending.drain(..pending.len().min(room as usize)).collect();
            let names: Vec<&str> = chunk.iter().map(|(h, _)| h.as_str()).collect();
            let next = base.with(&names, now, self.lease_ms());
            let value = next.encode();
            let written = if revision == 0 {
                self.store.create(&key, value).await.map_err(|e| {
                    (
                        e.kind() == kv::CreateErrorKind::AlreadyExists,
                        e.to_string(),
                    )
                })
            } else {
                self.store.update(&key, value, revision).await.map_err(|e| {
                    (
                        e.kind() == kv::UpdateErrorKind::WrongLastRevision,
                        e.to_string(),
                    )
                })
            };
            match written {
                Ok(rev) => {
                    tracing::debug!(%key, admitted = chunk.len(), revision = rev, "slots taken");
                    self.view().wrote(&key, Some(next), rev);
                    self.set_cursor(policy, b);
                    let this = self.clone();
                    tokio::spawn(async move { this.after_write(key, b, chunk, rev).await });
                }
                Err((true, _)) => {
                    // Another instance wrote the block first: read it, and try again.
                    lost += 1;
                    let fresh = self.read(&key).await;
                    let mut rest = Vec::new();
                    let mut landed = Vec::new();
                    for (holder, replies) in chunk {
                        // A write reported lost that landed after all (a retried request):
                        // checked as any admission is, from the revision read.
                        match &fresh {
                            Ok(Some(s)) if s.block.holds(&holder) => landed.push((holder, replies)),
                            _ => rest.push((holder, replies)),
                        }
                    }
                    if let (false, Ok(Some(s))) = (landed.is_empty(), &fresh) {
                        let (this, key, revision) = (self.clone(), key.clone(), s.revision);
                        tokio::spawn(
                            async move { this.after_write(key, b, landed, revision).await },
                        );
                    }
                    if fresh.is_err() {
                        tried.push(b);
                    }
                    rest.append(&mut pending);
                    pending = rest;
                    if lost >= BATCH_ATTEMPTS {
                        answer_all(pending, || Ok(Taken::Full));
                        return;
                    }
                }
                Err((false, why)) => {
                    // Maybe written, maybe not. Not given back: another copy of a run may be
                    // sharing the slot (see `Slots::shared`) and its allow be the one used.
                    // The error makes the dispatcher undo the run if its event is denied; if
                    // it is allowed, the close frees the slot.
                    answer_all(chunk, || Err(why.clone()));
                    answer_all(pending, || Err(why.clone()));
                    return;
                }
            }
        }
    }

    fn queue_cursor(&self, policy: &str) -> Option<u32> {
        let queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        queues.get(policy).and_then(|q| q.cursor)
    }

    fn set_cursor(&self, policy: &str, b: u32) {
        let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(q) = queues.get_mut(policy) {
            q.cursor = Some(b);
        }
    }

    /// A copy of an admission (another dispatcher's run of a hedged event, or a late agent
    /// call) can take its slot after the connection was closed or its event denied: a close
    /// cannot free a slot that is not taken yet. So once the view has the write, an admission
    /// checks whether a slot of the same connection was freed before it, or its run undone,
    /// and if so gives its own back. Every slot then is either taken before the close's (or
    /// undo's) second look at the bucket (and freed by it) or after its first release or
    /// marker (and given back here). A view too far behind to check fails closed (keeping the
    /// slot for the undo).
    async fn after_write(
        self: Arc<Self>,
        key: String,
        b: u32,
        chunk: Vec<(String, Vec<Reply>)>,
        revision: u64,
    ) {
        if let Err(e) = self.applied_up_to(revision).await {
            // Failing closed, but keeping the slot for the same reason as a write whose
            // outcome is unknown (see `admit_batch`): the undo or the close frees it.
            tracing::warn!(%key, error = %e, "could not check new slots against releases: failing closed");
            let why = format!("could not check the slot against releases: {e}");
            answer_all(chunk, || Err(why.clone()));
            return;
        }
        for (holder, replies) in chunk {
            let gone = {
                let view = self.view();
                view.released_before(token_of(&holder), revision) || view.is_undone(&holder)
            };
            if !gone {
                answer(replies, || Ok(Taken::Slot(b)));
                continue;
            }
            tracing::debug!(%key, %holder, "the connection was released before this admission took its slot: given back");
            let slot = SlotRef {
                key: key.clone(),
                holder,
            };
            match self.release_exact(std::slice::from_ref(&slot)).await {
                Ok(()) => answer(replies, || Ok(Taken::Released)),
                Err(e) => {
                    self.give_back(vec![slot]);
                    answer(replies, || Err(e.clone()));
                }
            }
        }
    }
}
