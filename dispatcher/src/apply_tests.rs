//! The apply plan: what changes, what is kept, in which order it is written.

use super::*;

fn stored(pairs: &[(&str, &str, u64)]) -> BTreeMap<String, Stored> {
    pairs
        .iter()
        .map(|(k, v, revision)| {
            let value = Bytes::copy_from_slice(v.as_bytes());
            (
                k.to_string(),
                Stored {
                    value,
                    revision: *revision,
                },
            )
        })
        .collect()
}

fn wanted(pairs: &[(&str, &str)]) -> BTreeMap<String, Bytes> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), Bytes::copy_from_slice(v.as_bytes())))
        .collect()
}

#[test]
fn a_plan_adds_changes_keeps_and_prunes_against_each_revision() {
    let have = stored(&[
        ("pol.acl.same", "a", 3),
        ("pol.acl.edit", "old", 4),
        ("pol.acl.gone", "x", 5),
    ]);
    let want = wanted(&[
        ("pol.acl.same", "a"),
        ("pol.acl.edit", "new"),
        ("pol.acl.new", "n"),
        ("sub.new-connection.acl", "s"),
    ]);
    let p = plan(&want, &have, |_, _| false);
    assert_eq!(p.unchanged, ["pol.acl.same"]);
    let seen: Vec<(ChangeOp, Section, &str, u64)> = p
        .steps
        .iter()
        .map(|s| {
            let r = s.write.expected_revision;
            (s.planned.op, s.planned.section, s.planned.name.as_str(), r)
        })
        .collect();
    assert_eq!(
        seen,
        [
            (
                ChangeOp::Add,
                Section::Subscription,
                "new-connection/acl",
                0
            ),
            (ChangeOp::Add, Section::Policy, "acl/new", 0),
            (ChangeOp::Change, Section::Policy, "acl/edit", 4),
        ]
    );
    assert_eq!(p.steps[2].old.as_deref(), Some(&b"old"[..]));
    assert_eq!(p.kept.len(), 1);
    assert_eq!(p.kept[0].name, "acl/gone");

    let p = plan(&want, &have, |_, _| true);
    assert!(p.kept.is_empty());
    let gone = p.steps.last().expect("a removal");
    assert_eq!(
        (gone.planned.op, gone.write.expected_revision),
        (ChangeOp::Remove, 5)
    );
    assert!(gone.write.value.is_none());
    assert_eq!(gone.old.as_deref(), Some(&b"x"[..]));

    let p = plan(
        &wanted(&[("pol.acl.same", "a")]),
        &stored(&[("pol.acl.same", "a", 3)]),
        |_, _| true,
    );
    assert!(p.steps.is_empty() && p.kept.is_empty() && p.unchanged.len() == 1);
}

#[test]
fn writes_put_policies_before_their_subscriptions_and_remove_them_after() {
    let p = |op, section| Planned {
        op,
        section,
        name: String::new(),
    };
    let mut order = [
        p(ChangeOp::Remove, Section::Policy),
        p(ChangeOp::Add, Section::Subscription),
        p(ChangeOp::Remove, Section::Subscription),
        p(ChangeOp::Change, Section::Policy),
    ];
    order.sort_by_key(write_rank);
    let got: Vec<(ChangeOp, Section)> = order.iter().map(|p| (p.op, p.section)).collect();
    assert_eq!(
        got,
        [
            (ChangeOp::Change, Section::Policy),
            (ChangeOp::Add, Section::Subscription),
            (ChangeOp::Remove, Section::Subscription),
            (ChangeOp::Remove, Section::Policy),
        ]
    );
}
