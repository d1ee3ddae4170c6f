//! Reading a key-value bucket as the processes do (`bus::bucket`): the names from the stream's
//! subject index, the values from any replica or from the leader, deleted keys left out.

use async_nats::jetstream::kv;
use bus::bucket::{entries, names, Read};
use bytes::Bytes;

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
