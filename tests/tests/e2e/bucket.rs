//! Reading a key-value bucket as the processes do (`bus::bucket`): the names from the stream's
//! subject index, the values from any replica or from the leader, deleted keys left out; and many last values in one batched read.

use async_nats::jetstream::kv;
use bus::bucket::{entries, names, Read};
use bytes::Bytes;
use futures::StreamExt;

#[tokio::test(flavor = "multi_thread")]
async fn listings_and_loads_leave_deleted_and_purged_keys_out() {
    let nats = e2e::NatsServer::start();
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("connect"));
    let store = js
        .create_key_value(kv::Config {
            bucket: "listing".into(),
            history: 1,
            ..Default::default()
        })
        .await
        .expect("bucket");
    let kept = store.put("pol.acl.kept", "v1".into()).await.expect("put");
    for key in ["pol.acl.deleted", "pol.acl.purged"] {
        store.put(key, "gone".into()).await.expect("put");
    }
    store.delete("pol.acl.deleted").await.expect("delete");
    store.purge("pol.acl.purged").await.expect("purge");
    let sub = store
        .put("sub.new-connection.acl", "s".into())
        .await
        .expect("put");

    // The index still holds the deleted keys, with their markers.
    let listed = names(&store, &["pol."]).await.expect("names");
    assert_eq!(
        listed,
        ["pol.acl.deleted", "pol.acl.kept", "pol.acl.purged"]
    );
    assert_eq!(names(&store, &[""]).await.expect("names").len(), 4);
    for read in [Read::AnyReplica, Read::Leader] {
        let got = entries(&store, &["pol.", "sub."], 2, read)
            .await
            .expect("entries");
        let expected = [
            ("pol.acl.kept".to_string(), (Bytes::from("v1"), kept)),
            (
                "sub.new-connection.acl".to_string(),
                (Bytes::from("s"), sub),
            ),
        ];
        assert_eq!(got.into_iter().collect::<Vec<_>>(), expected, "{read:?}");
    }
}

/// conn-limit's confirmations read markers this way: many reads waiting together go in one
/// batched direct get, and each gets its own subject's last value, or none. A server before
/// 2.11 has no batched gets: the reader is not made, and the caller reads key by key.
#[tokio::test(flavor = "multi_thread")]
async fn batched_reads_answer_each_subject_and_share_requests() {
    let nats = e2e::NatsServer::start();
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let js = async_nats::jetstream::new(client.clone());
    let store = js
        .create_key_value(kv::Config {
            bucket: "lasts".into(),
            history: 1,
            ..Default::default()
        })
        .await
        .expect("bucket");
    let jet = bus::store::Jet::reach(&client, &bus::Subjects::default(), bus::store::Store::Conns)
        .await
        .expect("jet");
    let within = std::time::Duration::from_secs(5);
    let Some(lasts) = bus::lasts::Lasts::spawn(&jet, &store.stream_name, within) else {
        assert!(
            !client.is_server_compatible(2, 11, 0),
            "a server with batched gets has a reader"
        );
        return;
    };
    for i in (0..200).step_by(3) {
        store
            .put(format!("k{i}"), format!("v{i}").into())
            .await
            .expect("put");
    }
    store.put("k3", "newer".into()).await.expect("put");
    // Every request the reader sends, seen by a plain subscriber of the API subject.
    let mut requests = client
        .subscribe(format!("$JS.API.DIRECT.GET.{}", store.stream_name))
        .await
        .expect("subscribe");
    client.flush().await.expect("flush");

    // Every key, and some twice: a subject asked twice in one batch is asked once.
    let keys = (0..200).chain((0..200).step_by(7));
    let reads = keys.map(|i| {
        let lasts = lasts.clone();
        let subject = format!("{}k{i}", store.prefix);
        async move { (i, lasts.last(subject).await) }
    });
    for (i, got) in futures::future::join_all(reads).await {
        let expected = match i {
            3 => Some(Bytes::from("newer")),
            i if i % 3 == 0 => Some(Bytes::from(format!("v{i}"))),
            _ => None,
        };
        let got = got.expect("read");
        assert_eq!(got.as_ref().map(|l| l.payload.clone()), expected, "k{i}");
        if let Some(last) = got {
            let age = last.written.elapsed().unwrap_or_default();
            assert!(
                age < std::time::Duration::from_secs(60),
                "k{i} written {age:?} ago"
            );
        }
    }
    let mut sent = 0;
    while let Ok(Some(_)) =
        tokio::time::timeout(std::time::Duration::from_millis(200), requests.next()).await
    {
        sent += 1;
    }
    assert!((1..20).contains(&sent), "229 reads took {sent} requests");
}
