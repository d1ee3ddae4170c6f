//! `policyctl tap`: prints every decision as the dispatchers publish it, until Ctrl-C.

use anyhow::anyhow;
use bus::tap::TapRecord;
use bus::{codec, EventName};
use futures::StreamExt;

use crate::print::{line, tap_line};
use crate::TapOutput;

pub async fn run(
    nats: &async_nats::Client,
    subjects: &bus::Subjects,
    event: Option<&str>,
    output: TapOutput,
) -> anyhow::Result<()> {
    let subject = match event {
        Some(e) => subjects.tap(EventName::new(e)?.as_str()),
        None => subjects.tap_wildcard(),
    };
    let mut sub = nats.subscribe(subject).await?;
    // One Ctrl-C future for the whole loop, so a press is never lost between messages.
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            msg = sub.next() => {
                let Some(msg) = msg else { return Err(anyhow!("tap subscription closed")) };
                match codec::decode::<TapRecord>("tap record", &msg.payload) {
                    Ok(rec) => {
                        // A reader that went away (`policyctl tap | head`) ends the stream.
                        if line(&tap_line(&rec, output)?).is_err() {
                            return Ok(());
                        }
                    }
                    Err(e) => eprintln!("policyctl: skipped a tap message on {}: {e}", msg.subject),
                }
            }
        }
    }
}
