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

async fn ping(
    nats: &async_nats::Client,
    service: &str,
    window: Duration,
    enough: usize,
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
            seen += 1;
            if seen >= enough {
                break;
            }
        }
    }
    Ok(seen)
}
