//! A batch's answer, message by message, as nats-server sends it (`getDirectMulti`).

use async_nats::{HeaderMap, Message, StatusCode};

use super::*;

fn message(headers: &[(&str, &str)], status: Option<u16>, description: Option<&str>) -> Message {
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        map.insert(*k, *v);
    }
    Message {
        subject: "_INBOX.x.1".into(),
        reply: None,
        payload: Bytes::new(),
        headers: Some(map),
        status: status.map(|s| StatusCode::from_u16(s).expect("status")),
        description: description.map(str::to_string),
        length: 0,
    }
}

/// A stored message of the answer, naming the one before it.
fn stored(subject: &str, seq: u64, previous: u64, pending: u64) -> Message {
    let (seq, previous, pending) = (seq.to_string(), previous.to_string(), pending.to_string());
    let mut m = message(
        &[
            ("Nats-Stream", "KV_c"),
            ("Nats-Subject", subject),
            ("Nats-Sequence", &seq),
            ("Nats-Time-Stamp", "2026-12-05T09:13:03.245370123Z"),
            ("Nats-Num-Pending", &pending),
            ("Nats-Last-Sequence", &previous),
        ],
        None,
        None,
    );
    m.payload = Bytes::from(format!("value of {subject}"));
    m
}

fn end(last: u64, pending: u64) -> Message {
    let (last, pending) = (last.to_string(), pending.to_string());
    message(
        &[
            ("Nats-Num-Pending", &pending),
            ("Nats-Last-Sequence", &last),
        ],
        Some(204),
        Some("EOB"),
    )
}

fn answer(messages: Vec<Message>) -> Result<HashMap<String, Last>, LastsError> {
    let mut chain = Chain::default();
    for m in messages {
        if let Some(done) = chain.take(m) {
            return done;
        }
    }
    panic!("the answer never ended");
}

#[test]
fn a_whole_chain_answers_each_subject_found() {
    let found = answer(vec![stored("a", 4, 0, 1), stored("b", 9, 4, 0), end(9, 0)]).expect("ok");
    assert_eq!(found.len(), 2);
    assert_eq!(found["b"].payload, Bytes::from("value of b"));
    let written = found["a"]
        .written
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("time");
    assert_eq!(written.as_secs(), 1_796_461_983);
}

#[test]
fn no_results_is_an_answer_and_every_other_status_an_error() {
    let none = message(&[], Some(404), Some("No Results"));
    assert!(answer(vec![none]).expect("ok").is_empty());
    for (code, description) in [
        (404, "Message Not Found"),
        (408, "Empty Request"),
        (503, ""),
    ] {
        let m = message(&[], Some(code), Some(description));
        assert!(
            matches!(answer(vec![m]), Err(LastsError::Status(_))),
            "{code} {description}"
        );
    }
}

#[test]
fn a_lost_or_cut_answer_is_an_error_never_an_absence() {
    // The message of sequence 4 never arrived: the next names it.
    let gap = answer(vec![stored("b", 9, 4, 0), end(9, 0)]);
    assert!(matches!(gap, Err(LastsError::Incomplete(_))), "{gap:?}");
    // The server stopped at its byte limit: the end says one is left.
    let cut = answer(vec![stored("a", 4, 0, 1), end(4, 1)]);
    assert!(matches!(cut, Err(LastsError::Incomplete(_))), "{cut:?}");
    // The same cut as nats-server 2.11 ends it, one short: only the message's count says so.
    let cut_211 = answer(vec![stored("a", 4, 0, 1), end(4, 0)]);
    assert!(
        matches!(cut_211, Err(LastsError::Incomplete(_))),
        "{cut_211:?}"
    );
    // The last message was lost: the end names it.
    let last = answer(vec![stored("a", 4, 0, 1), end(9, 0)]);
    assert!(matches!(last, Err(LastsError::Incomplete(_))), "{last:?}");
    // A message without its subject cannot be placed.
    let nameless = message(&[("Nats-Last-Sequence", "0")], None, None);
    let unnamed = answer(vec![nameless, end(4, 0)]);
    assert!(
        matches!(unnamed, Err(LastsError::Incomplete(_))),
        "{unnamed:?}"
    );
}
