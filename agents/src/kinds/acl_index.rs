//! The ACL's rule index: an event checks only the rules that can match it, in evaluation
//! order.

use std::collections::HashMap;

use bus::Action;

use super::{Query, Rule};
use crate::pattern::Pattern;
use crate::selector::Selector;

/// Rules in evaluation order, indexed by exact `dst_service` and exact `src_peer`: an event
/// checks only the rules that name its service and peer, or leave either open, never the
/// whole list (100 000 rules over 500 services and as many peers stay in microseconds).
#[derive(Debug, Default)]
pub(super) struct Index {
    pub(super) rules: Vec<Rule>,
    /// Exact `dst_service` and exact `src_peer`.
    by_both: HashMap<String, HashMap<String, Vec<u32>>>,
    /// Exact `dst_service`; `src_peer` absent, `*` or a prefix.
    by_dst: HashMap<String, Vec<u32>>,
    /// Exact `src_peer`; `dst_service` absent, `*` or a prefix.
    by_peer: HashMap<String, Vec<u32>>,
    /// Neither exact, but a label the destination service must have (`dst_labels`'
    /// `matchLabels`): label key -> value -> rules.
    by_dst_label: HashMap<String, HashMap<String, Vec<u32>>>,
    /// None of those: checked for every event.
    wild: Vec<u32>,
}

impl Index {
    pub(super) fn new(mut rules: Vec<(i32, Rule)>) -> Self {
        rules.sort_by(|(pa, a), (pb, b)| {
            let deny_first = |r: &Rule| r.action != Action::Deny;
            (a.level, pa, deny_first(a), &a.id).cmp(&(b.level, pb, deny_first(b), &b.id))
        });
        let rules: Vec<Rule> = rules.into_iter().map(|(_, r)| r).collect();
        let mut index = Index::default();
        for (i, r) in rules.iter().enumerate() {
            let i = i as u32;
            let dst = r.m.dst_service.as_ref().and_then(Pattern::exact);
            let peer = r.m.src_peer.as_ref().and_then(Pattern::exact);
            match (dst, peer) {
                (Some(d), Some(p)) => index
                    .by_both
                    .entry(d.to_string())
                    .or_default()
                    .entry(p.to_string())
                    .or_default()
                    .push(i),
                (Some(d), None) => index.by_dst.entry(d.to_string()).or_default().push(i),
                (None, Some(p)) => index.by_peer.entry(p.to_string()).or_default().push(i),
                (None, None) => match r.m.dst_labels.as_ref().and_then(Selector::required_pair) {
                    Some((k, v)) => index
                        .by_dst_label
                        .entry(k.to_string())
                        .or_default()
                        .entry(v.to_string())
                        .or_default()
                        .push(i),
                    None => index.wild.push(i),
                },
            }
        }
        index.rules = rules;
        index
    }

    /// The rules that may match, in evaluation order: a merge of the sorted index lists. A
    /// rule naming an exact service or peer, or requiring a label of the service, cannot
    /// match an event without it.
    pub(super) fn candidates<'s>(&'s self, q: &Query) -> impl Iterator<Item = &'s Rule> + 's {
        const NONE: &[u32] = &[];
        let both = q
            .dst_service
            .zip(q.src_peer)
            .and_then(|(d, p)| self.by_both.get(d)?.get(p))
            .map_or(NONE, Vec::as_slice);
        let dst = q
            .dst_service
            .and_then(|d| self.by_dst.get(d))
            .map_or(NONE, Vec::as_slice);
        let peer = q
            .src_peer
            .and_then(|p| self.by_peer.get(p))
            .map_or(NONE, Vec::as_slice);
        let mut fixed = [both, dst, peer, self.wild.as_slice()];
        // The label lists, if any: a Vec that allocates only for an event with labels that
        // index rules.
        let mut labelled: Vec<&'s [u32]> = Vec::new();
        if let (false, Some(labels)) = (self.by_dst_label.is_empty(), q.dst_labels) {
            // Over the smaller side: an event may carry thousands of labels, and an index
            // many keys; each lookup is by key, so either way finds the same lists.
            if labels.len() <= self.by_dst_label.len() {
                for (k, v) in labels {
                    if let Some(l) = self.by_dst_label.get(k).and_then(|m| m.get(v)) {
                        labelled.push(l);
                    }
                }
            } else {
                for (k, by_value) in &self.by_dst_label {
                    if let Some(l) = labels.get(k).and_then(|v| by_value.get(v)) {
                        labelled.push(l);
                    }
                }
            }
        }
        std::iter::from_fn(move || {
            let next = fixed
                .iter_mut()
                .chain(labelled.iter_mut())
                .filter(|l| !l.is_empty())
                .min_by_key(|l| l[0])?;
            let (first, rest) = next.split_first()?;
            *next = rest;
            Some(&self.rules[*first as usize])
        })
    }

    pub(super) fn first_match(&self, q: &Query) -> Option<&Rule> {
        self.candidates(q).find(|r| r.matches(q))
    }
}
