//! Finding live instances through the NATS services API (`$SRV.PING`): to wait for a process
//! to be ready, and to check that a kind has an instance before it is put in a chain.

use std::time::Duration;

use bytes::Bytes;

use crate::subject::Subjects;

/// Counts the live instances of a NATS service (by `$SRV.PING`), waiting `window` for
/// answers. Used to wait for a process to be ready and to check an engine is whole.
pub async fn count_instances(
    nats: &async_nats::Client,
    service: &str,
    window: Duration,
) -> Result<usize, async_nats::Error> {
    ping(nats, service, window, usize::MAX).await
}

/// Whether any instance of a NATS service answers `$SRV.PING` within `window`; returns at the
/// first answer.
pub async fn any_instance(
    nats: &async_nats::Client,
    service: &str,
    window: Duration,
) -> Result<bool, async_nats::Error> {
    Ok(ping(nats, service, window, 1).await? > 0)
}

/// The `$SRV.PING` answers of a NATS service's live instances within `window`: each names
/// its instance (`id`) and says its `metadata`.
pub async fn instances(
    nats: &async_nats::Client,
    service: &str,
    window: Duration,
) -> Result<Vec<serde_json::Value>, async_nats::Error> {
    let mut out = Vec::new();
    answers(nats, service, window, usize::MAX, |payload| {
        if let Ok(v) = serde_json::from_slice(payload) {
            out.push(v);
        }
    })
    .await?;
    Ok(out)
}

async fn ping(
    nats: &async_nats::Client,
    service: &str,
    window: Duration,
    enough: usize,
) -> Result<usize, async_nats::Error> {
    answers(nats, service, window, enough, |_| {}).await
}

async fn answers(
    nats: &async_nats::Client,
    service: &str,
    window: Duration,
    enough: usize,
    mut each: impl FnMut(&[u8]),
) -> Result<usize, async_nats::Error> {
    use futures::StreamExt;
    let inbox = nats.new_inbox();
    let mut sub = nats.subscribe(inbox.clone()).await?;
    nats.publish_with_reply(Subjects::service_ping(service), inbox, Bytes::new())
        .await?;
    nats.flush().await?;
    let mut seen = 0;
    let deadline = tokio::time::Instant::now() + window;
    while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, sub.next()).await {
        // With no instance at all the server answers "no responders" (a status, no payload):
        // that is not an instance.
        if msg.status.is_none() && !msg.payload.is_empty() {
            each(&msg.payload);
            seen += 1;
            if seen >= enough {
                break;
            }
        }
    }
    Ok(seen)
}
