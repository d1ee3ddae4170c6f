//! `agent deploy`'s wait: a module is live once every wasm host says, in its kind's services
//! API metadata, that it serves the deployed version.

use bus::AdminClient;

use crate::print::out;

/// Waits until every live wasm host serves the deployed version (its kind's services API
/// metadata says the digest), so that the next command (`subscribe`, `policy add`) finds it.
pub async fn served(
    admin: &AdminClient,
    m: &bus::admin::Module,
    wait: std::time::Duration,
) -> anyhow::Result<()> {
    let window = std::time::Duration::from_millis(200);
    let deadline = tokio::time::Instant::now() + wait;
    let service = bus::headers::agent_service(&m.kind);
    loop {
        let hosts =
            bus::client::count_instances(admin.nats(), bus::headers::WASM_HOST_SERVICE, window)
                .await
                .map_err(|e| anyhow::anyhow!("cannot ask the wasm hosts: {e}"))?;
        let serving = bus::discovery::instances(admin.nats(), &service, window)
            .await
            .map_err(|e| anyhow::anyhow!("cannot ask the hosts of {}: {e}", m.kind))?
            .iter()
            .filter(|i| i["metadata"][bus::modules::SERVED] == m.digest.as_str())
            .count();
        if hosts == 0 {
            out!("no wasm host is live: the first to start serves {}", m.kind);
            return Ok(());
        }
        if serving >= hosts {
            out!("served by {serving} of {hosts} wasm hosts");
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(crate::explain::Exit(
                1,
                format!(
                    "{} is stored, but {serving} of {hosts} wasm hosts serve this version after {}; \
                     a host that cannot load it logs `deployed module does not load here`",
                    m.kind,
                    humantime::format_duration(wait)
                ),
            )
            .into());
        }
    }
}
