//! The limiter's races, against an in-memory store that behaves as JetStream does for it
//! (conditional writes, `discard: new` at the limit), with other instances' operations
//! injected at the points where they hurt: between a copy's write and its confirmation,
//! between a read and the write that follows it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::*;
use crate::kinds::conn_store::Slot;

#[derive(Default)]
struct Inner {
    /// (policy, connection) -> (runs, revision)
    slots: HashMap<(String, String), (Vec<String>, u64)>,
    max: HashMap<String, u32>,
    markers: Vec<String>,
    revision: u64,
    /// Answer `Full` before checking the expected revision, as a server that checks its
    /// limits first would.
    limits_first: bool,
}

type Hook = Box<dyn FnOnce() + Send>;

/// The store, shared by every "instance" (each a `Slots` over a clone).
#[derive(Clone, Default)]
struct Mem {
    inner: Arc<Mutex<Inner>>,
    /// Run once, right after the named operation's next call.
    hooks: Arc<Mutex<Vec<(&'static str, Hook)>>>,
}

impl Mem {
    fn after(&self, op: &'static str, f: impl FnOnce() + Send + 'static) {
        self.hooks.lock().unwrap().push((op, Box::new(f)));
    }

    fn fire(&self, op: &str) {
        let hook = {
            let mut hooks = self.hooks.lock().unwrap();
            let i = hooks.iter().position(|(o, _)| *o == op);
            i.map(|i| hooks.remove(i).1)
        };
        if let Some(f) = hook {
            f();
        }
    }

    fn held(&self, policy: &str) -> Vec<(String, Vec<String>)> {
        let inner = self.inner.lock().unwrap();
        let mut held: Vec<(String, Vec<String>)> = inner
            .slots
            .iter()
            .filter(|((p, _), _)| p == policy)
            .map(|((_, c), (runs, _))| (c.clone(), runs.clone()))
            .collect();
        held.sort();
        held
    }

    /// The lease passed for this slot: the store drops it.
    fn expire(&self, policy: &str, connection: &str) {
        let key = (policy.to_string(), connection.to_string());
        self.inner.lock().unwrap().slots.remove(&key);
    }

    fn instance(&self) -> Slots<Mem> {
        Slots::new(self.clone())
    }
}

fn marker_key(m: &Marker<'_>) -> String {
    format!("{m:?}")
}

impl SlotStore for Mem {
    async fn prepare(&self, policy: &str, max: u32) -> Result<(), StoreError> {
        self.inner.lock().unwrap().max.insert(policy.into(), max);
        Ok(())
    }

    async fn get(&self, policy: &str, connection: &str) -> Result<Option<Slot>, StoreError> {
        let got = {
            let inner = self.inner.lock().unwrap();
            let key = (policy.to_string(), connection.to_string());
            inner.slots.get(&key).map(|(runs, revision)| Slot {
                runs: runs.clone(),
                revision: *revision,
            })
        };
        self.fire("get");
        Ok(got)
    }

    async fn put(
        &self,
        policy: &str,
        connection: &str,
        runs: &[String],
        expected: u64,
    ) -> Result<Written, StoreError> {
        let written = {
            let mut inner = self.inner.lock().unwrap();
            let key = (policy.to_string(), connection.to_string());
            let current = inner.slots.get(&key).map_or(0, |(_, r)| *r);
            let count = inner.slots.keys().filter(|(p, _)| p == policy).count();
            let max = inner.max.get(policy).copied().unwrap_or(0) as usize;
            let full = current == 0 && count >= max;
            if inner.limits_first && count >= max && expected == 0 {
                Written::Full
            } else if current != expected {
                Written::Conflict
            } else if full {
                Written::Full
            } else {
                inner.revision += 1;
                let revision = inner.revision;
                inner.slots.insert(key, (runs.to_vec(), revision));
                Written::Yes
            }
        };
        self.fire("put");
        Ok(written)
    }

    async fn remove(
        &self,
        policy: &str,
        connection: &str,
        revision: u64,
    ) -> Result<Written, StoreError> {
        let mut inner = self.inner.lock().unwrap();
        let key = (policy.to_string(), connection.to_string());
        if inner.slots.get(&key).is_some_and(|(_, r)| *r == revision) {
            inner.slots.remove(&key);
            Ok(Written::Yes)
        } else {
            Ok(Written::Conflict)
        }
    }

    async fn mark(&self, marker: Marker<'_>) -> Result<(), StoreError> {
        self.inner.lock().unwrap().markers.push(marker_key(&marker));
        Ok(())
    }

    async fn marked(&self, connection: &str, run: &str) -> Result<bool, StoreError> {
        let inner = self.inner.lock().unwrap();
        let markers = [Marker::Closed(connection), Marker::Undone(connection, run)];
        Ok(markers
            .iter()
            .any(|m| inner.markers.contains(&marker_key(m))))
    }

    async fn in_use(&self, policy: &str) -> Result<u64, StoreError> {
        Ok(self.held(policy).len() as u64)
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    futures::executor::block_on(f)
}

#[tokio::test]
async fn hedged_copies_on_two_instances_hold_one_slot_and_the_limit_stays_exact() {
    let mem = Mem::default();
    let (a, b) = (mem.instance(), mem.instance());
    // Three connections, each admitted by two copies of its run, one per instance, against
    // a limit of two: two connections are in, each holding one slot.
    let mut admitted = Vec::new();
    for c in ["c1", "c2", "c3"] {
        let first = a.admit("db", 2, c, "r").await.unwrap();
        let second = b.admit("db", 2, c, "r").await.unwrap();
        admitted.push((c, first, second));
    }
    assert_eq!(
        admitted,
        [
            ("c1", Admission::Took, Admission::Held),
            ("c2", Admission::Took, Admission::Held),
            ("c3", Admission::Full, Admission::Full),
        ]
    );
    assert_eq!(mem.held("db").len(), 2);
}

#[tokio::test]
async fn a_copy_that_meets_its_twin_mid_write_shares_the_slot() {
    let mem = Mem::default();
    let (a, b) = (mem.instance(), mem.instance());
    // The twin's copy arrives while this one is between its write and its confirmation.
    mem.after("put", move || {
        assert_eq!(block_on(b.admit("db", 5, "c1", "r")), Ok(Admission::Held));
    });
    assert_eq!(a.admit("db", 5, "c1", "r").await, Ok(Admission::Took));
    // No close, no undo: the confirmation keeps it.
    assert_eq!(a.confirm("c1", "r", &["db"]).await, Ok(false));
    assert_eq!(mem.held("db"), [("c1".to_string(), vec!["r".to_string()])]);
}

#[tokio::test]
async fn runs_of_one_event_on_two_dispatchers_share_the_slot_until_both_are_undone() {
    let mem = Mem::default();
    let (a, b) = (mem.instance(), mem.instance());
    assert_eq!(a.admit("db", 1, "c1", "r1").await, Ok(Admission::Took));
    // Full for any other connection, but this one holds its slot already.
    assert_eq!(b.admit("db", 1, "c1", "r2").await, Ok(Admission::Took));
    assert_eq!(b.admit("db", 1, "c2", "r3").await, Ok(Admission::Full));
    // The late run's undo keeps the slot the other run's allow uses.
    b.undo("c1", "r2", &["db"]).await.unwrap();
    assert_eq!(mem.held("db"), [("c1".to_string(), vec!["r1".to_string()])]);
    a.undo("c1", "r1", &["db"]).await.unwrap();
    assert!(mem.held("db").is_empty());
}

#[tokio::test]
async fn a_close_before_the_admission_leaves_nothing_held() {
    let mem = Mem::default();
    let (a, b) = (mem.instance(), mem.instance());
    // The gateway cancelled a connection whose decision never came; a copy of its admission
    // reaches the other instance afterwards.
    a.close("c1", &["db"]).await.unwrap();
    assert_eq!(b.admit("db", 5, "c1", "r").await, Ok(Admission::Took));
    // Confirmed after the answer: given back.
    assert_eq!(b.confirm("c1", "r", &["db"]).await, Ok(true));
    assert!(mem.held("db").is_empty());
}

#[tokio::test]
async fn a_close_that_races_its_own_admission_frees_it() {
    let mem = Mem::default();
    let (a, b) = (mem.instance(), mem.instance());
    // The close lands between the admission's write and its confirmation, and frees the slot
    // before the admission looks: the admission finds the marker and nothing to give back.
    let closer = b;
    mem.after("put", move || {
        block_on(closer.close("c1", &["db"])).unwrap()
    });
    assert_eq!(a.admit("db", 5, "c1", "r").await, Ok(Admission::Took));
    // Confirmed after the answer: given back.
    assert_eq!(a.confirm("c1", "r", &["db"]).await, Ok(true));
    assert!(mem.held("db").is_empty());
    // The close ran its free before the write instead: the marker catches the write.
    let mem = Mem::default();
    let (a, b) = (mem.instance(), mem.instance());
    b.close("c2", &["db"]).await.unwrap();
    assert_eq!(a.admit("db", 5, "c2", "r").await, Ok(Admission::Took));
    // Confirmed after the answer: given back.
    assert_eq!(a.confirm("c2", "r", &["db"]).await, Ok(true));
    assert!(mem.held("db").is_empty());
}

#[tokio::test]
async fn an_undo_frees_the_run_wherever_and_whenever_its_copies_write() {
    let mem = Mem::default();
    let (a, b) = (mem.instance(), mem.instance());
    // The dispatcher timed out on conn-limit and undid the run; a copy writes afterwards.
    a.undo("c1", "r", &["db"]).await.unwrap();
    assert_eq!(b.admit("db", 5, "c1", "r").await, Ok(Admission::Took));
    // Confirmed after the answer: given back.
    assert_eq!(b.confirm("c1", "r", &["db"]).await, Ok(true));
    // Another run of the same connection is not affected.
    assert_eq!(b.admit("db", 5, "c1", "r2").await, Ok(Admission::Took));
    // An undo that lands between a copy's write and its confirmation.
    let undoer = a;
    mem.after("put", move || {
        block_on(undoer.undo("c3", "r", &["db"])).unwrap()
    });
    assert_eq!(b.admit("db", 5, "c3", "r").await, Ok(Admission::Took));
    // Confirmed after the answer: given back.
    assert_eq!(b.confirm("c3", "r", &["db"]).await, Ok(true));
    assert_eq!(mem.held("db"), [("c1".to_string(), vec!["r2".to_string()])]);
}

#[tokio::test]
async fn a_refused_copy_gives_nothing_back() {
    let mem = Mem::default();
    let a = mem.instance();
    assert_eq!(a.admit("one", 1, "other", "r0").await, Ok(Admission::Took));
    // The copy takes `db`, is refused by `one`: `db` stays held for the run, since another
    // copy's allow may be the answer used; the run's undo frees it if the event is denied.
    assert_eq!(a.admit("db", 5, "c1", "r").await, Ok(Admission::Took));
    assert_eq!(a.admit("one", 1, "c1", "r").await, Ok(Admission::Full));
    assert_eq!(mem.held("db"), [("c1".to_string(), vec!["r".to_string()])]);
    a.undo("c1", "r", &["db", "one"]).await.unwrap();
    assert!(mem.held("db").is_empty());
    assert_eq!(mem.held("one").len(), 1, "the other connection's slot");
}

#[tokio::test]
async fn the_lease_frees_a_slot_and_renewal_rewrites_it() {
    let mem = Mem::default();
    let a = mem.instance();
    assert_eq!(a.admit("db", 1, "c1", "r").await, Ok(Admission::Took));
    let before = mem.inner.lock().unwrap().revision;
    assert_eq!(a.renew("c1", &["db", "unused"]).await, Ok(1));
    assert!(mem.inner.lock().unwrap().revision > before, "written again");
    // The lease passes without a renewal: the slot is free for another connection.
    mem.expire("db", "c1");
    assert_eq!(a.admit("db", 1, "c2", "r2").await, Ok(Admission::Took));
    // The expired connection's close frees nothing of the new one.
    a.close("c1", &["db"]).await.unwrap();
    assert_eq!(mem.held("db"), [("c2".to_string(), vec!["r2".to_string()])]);
}

#[tokio::test]
async fn a_full_answer_for_a_connection_that_holds_its_slot_is_a_hold() {
    let mem = Mem::default();
    mem.inner.lock().unwrap().limits_first = true;
    let (a, b) = (mem.instance(), mem.instance());
    assert_eq!(a.admit("db", 1, "c1", "r1").await, Ok(Admission::Took));
    assert_eq!(b.admit("db", 1, "c1", "r1").await, Ok(Admission::Held));
    assert_eq!(b.admit("db", 1, "c1", "r2").await, Ok(Admission::Took));
    assert_eq!(b.admit("db", 1, "c2", "r3").await, Ok(Admission::Full));
}

#[tokio::test]
async fn a_release_that_loses_a_race_reads_again() {
    let mem = Mem::default();
    let (a, b) = (mem.instance(), mem.instance());
    assert_eq!(a.admit("db", 5, "c1", "r1").await, Ok(Admission::Took));
    // Between the undo's read and its removal, another run joins the slot: the removal is
    // refused (the slot moved on), and the undo takes its run out of the new value instead.
    let joiner = b;
    mem.after("get", move || {
        assert_eq!(
            block_on(joiner.admit("db", 5, "c1", "r2")),
            Ok(Admission::Took)
        );
    });
    a.undo("c1", "r1", &["db"]).await.unwrap();
    assert_eq!(mem.held("db"), [("c1".to_string(), vec!["r2".to_string()])]);
}

#[tokio::test]
async fn a_slot_lists_a_bounded_number_of_runs_and_refuses_more() {
    let mem = Mem::default();
    let a = mem.instance();
    for r in 0..MAX_RUNS {
        assert_eq!(
            a.admit("db", 5, "c1", &format!("r{r}")).await,
            Ok(Admission::Took)
        );
    }
    // A ninth run is refused (fails closed) rather than held unlisted: the listed runs'
    // undos would otherwise free the slot under its allow.
    assert!(a.admit("db", 5, "c1", "r-more").await.is_err());
    assert_eq!(a.admit("db", 5, "c1", "r0").await, Ok(Admission::Held));
}

#[tokio::test(start_paused = true)]
async fn a_write_that_lands_after_its_undo_is_given_back_by_settle() {
    let mem = Mem::default();
    let a = mem.instance();
    // The admission's write got no acknowledgement; the run was undone, and only then did the
    // write land (a client that sends it once it reconnects).
    a.undo("c1", "r", &["db"]).await.unwrap();
    mem.inner.lock().unwrap().max.insert("db".into(), 5);
    assert_eq!(
        mem.instance()
            .store
            .put("db", "c1", &["r".to_string()], 0)
            .await,
        Ok(Written::Yes)
    );
    assert_eq!(mem.held("db").len(), 1);
    a.settle("db", "c1", "r").await;
    assert!(mem.held("db").is_empty(), "given back");
}
