//! The wasm host's call slots, shared fairly between its kinds.
//!
//! A call may hold its memory cap and a blocking thread for as long as its fuel lasts, so the
//! host runs only so many at once (two per core). With one pool taken first come, first
//! served, a module that burns its whole fuel on every call would hold every slot while its
//! requests queue, and another kind's calls would wait behind them. So each kind may hold at
//! most its fair share while another kind waits, the slots divided by the kinds that are
//! calling or waiting (rounded up): a freed slot goes to a kind under its share, and a kind
//! alone may use them all.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The host's call slots.
pub struct CallSlots {
    total: usize,
    kinds: Mutex<HashMap<String, Use>>,
    freed: tokio::sync::Notify,
}

#[derive(Default, Clone, Copy)]
struct Use {
    running: usize,
    waiting: usize,
}

/// One call's slot: given back when dropped.
pub struct Slot {
    slots: Arc<CallSlots>,
    kind: String,
}

impl CallSlots {
    pub fn new(total: usize) -> Arc<CallSlots> {
        Arc::new(CallSlots {
            total: total.max(1),
            kinds: Mutex::default(),
            freed: tokio::sync::Notify::new(),
        })
    }

    /// Two per core.
    pub fn per_core() -> Arc<CallSlots> {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        CallSlots::new(cores * 2)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Use>> {
        self.kinds.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `kind` may take a slot now: one is free, and it holds less than its share, or
    /// no other kind is waiting (a slot never idles while someone waits).
    fn may_take(&self, kinds: &HashMap<String, Use>, kind: &str) -> bool {
        let running: usize = kinds.values().map(|u| u.running).sum();
        if running >= self.total {
            return false;
        }
        let active = kinds
            .values()
            .filter(|u| u.running + u.waiting > 0)
            .count()
            .max(1);
        let share = self.total.div_ceil(active);
        let others_wait = kinds.iter().any(|(k, u)| k != kind && u.waiting > 0);
        kinds.get(kind).map_or(0, |u| u.running) < share || !others_wait
    }

    /// Waits for a slot for `kind`.
    pub async fn take(self: &Arc<Self>, kind: &str) -> Slot {
        {
            let mut kinds = self.lock();
            kinds.entry(kind.to_string()).or_default().waiting += 1;
        }
        loop {
            // Registered before the check, so a slot freed between the check and the wait
            // still wakes this caller.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut kinds = self.lock();
                if self.may_take(&kinds, kind) {
                    let u = kinds.entry(kind.to_string()).or_default();
                    u.waiting -= 1;
                    u.running += 1;
                    return Slot {
                        slots: self.clone(),
                        kind: kind.to_string(),
                    };
                }
            }
            freed.await;
        }
    }

    #[cfg(test)]
    fn running(&self, kind: &str) -> usize {
        self.lock().get(kind).map_or(0, |u| u.running)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        {
            let mut kinds = self.slots.lock();
            if let Some(u) = kinds.get_mut(&self.kind) {
                u.running -= 1;
                if u.running + u.waiting == 0 {
                    kinds.remove(&self.kind);
                }
            }
        }
        // Every waiter looks again: the share may have moved for each of them.
        self.slots.freed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_kind_that_holds_every_slot_yields_the_next_to_another() {
        let slots = CallSlots::new(4);
        // The hog takes every slot while it is alone.
        let mut hog: Vec<Slot> = Vec::new();
        for _ in 0..4 {
            hog.push(slots.take("spin").await);
        }
        assert_eq!(slots.running("spin"), 4);
        // More of its calls wait; then another kind's call comes.
        let more = {
            let slots = slots.clone();
            tokio::spawn(async move { slots.take("spin").await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let geo = {
            let slots = slots.clone();
            tokio::spawn(async move { slots.take("geo").await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        // The first slot freed goes to geo, under its share, not to the hog's next call.
        drop(hog.pop());
        let geo = tokio::time::timeout(Duration::from_secs(1), geo)
            .await
            .expect("geo got a slot")
            .expect("task");
        assert_eq!(slots.running("geo"), 1);
        assert_eq!(slots.running("spin"), 3);
        assert!(!more.is_finished(), "the hog passed its share");
        // With nobody else waiting, a freed slot goes to the hog again.
        drop(hog.pop());
        let more = tokio::time::timeout(Duration::from_secs(1), more)
            .await
            .expect("within its share again")
            .expect("task");
        assert_eq!(slots.running("spin"), 3);
        drop((geo, more, hog));
        assert_eq!(slots.running("spin") + slots.running("geo"), 0);
    }
}
