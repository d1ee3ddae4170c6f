//! Connecting as a role: the messaging connection, with the role's inbox, and the store
//! identity's (see `bus::store`).

use std::time::Duration;

use bus::roles::Role;
use bus::Subjects;

use crate::{redact, server_addrs, Auth, Common, DaemonError};

impl Common {
    pub fn subjects(&self) -> Result<Subjects, DaemonError> {
        Ok(Subjects::new(&self.prefix)?)
    }

    /// The URL list as it may be printed.
    pub fn redacted_url(&self) -> String {
        redact(&self.nats_url)
    }

    /// Connects to NATS as `role`. A long-running process (`retry`) waits for the server to
    /// come up and reconnects forever; a one-shot command fails at once with a message a person
    /// can act on.
    pub async fn connect(
        &self,
        name: &str,
        retry: bool,
        role: &Role,
    ) -> Result<async_nats::Client, DaemonError> {
        Ok(self.connect_watched(name, retry, role).await?.0)
    }

    /// [`Self::connect`], and the errors the server reports on the connection (a permissions
    /// violation above all): a one-shot command can fail with it at once instead of waiting for
    /// a reply that the server never let through.
    pub async fn connect_watched(
        &self,
        name: &str,
        retry: bool,
        role: &Role,
    ) -> Result<
        (
            async_nats::Client,
            tokio::sync::mpsc::UnboundedReceiver<String>,
        ),
        DaemonError,
    > {
        let addrs = server_addrs(&self.nats_url)?;
        let inbox = match &self.auth.inbox_prefix {
            Some(p) => p.clone(),
            None => role.inbox_prefix(&self.subjects()?),
        };
        let auth = self.auth.with_url_credentials(&addrs)?;
        self.connect_as(name, retry, auth, inbox).await
    }

    /// The connection through which the process reaches JetStream: its role's store identity
    /// when it has credentials for one (`--store-nkey-file`, `--store-creds`, or the files
    /// beside its own), else `main` itself (a plain bus, where everything shares one account).
    /// See `bus::store` for why a role's store access has an identity of its own.
    pub async fn connect_store(
        &self,
        name: &str,
        retry: bool,
        role: &Role,
        main: &async_nats::Client,
    ) -> Result<async_nats::Client, DaemonError> {
        let Some(auth) = self.auth.store_identity() else {
            return Ok(main.clone());
        };
        if role.store_account().is_none() {
            return Err(DaemonError::Auth(format!(
                "role {role} uses no JetStream store, so it has no store identity"
            )));
        }
        let inbox = role.store_inbox_prefix(&self.subjects()?);
        let (client, _) = self
            .connect_as(&format!("{name}-store"), retry, auth, inbox)
            .await?;
        Ok(client)
    }

    async fn connect_as(
        &self,
        name: &str,
        retry: bool,
        auth: Auth,
        inbox: String,
    ) -> Result<
        (
            async_nats::Client,
            tokio::sync::mpsc::UnboundedReceiver<String>,
        ),
        DaemonError,
    > {
        let (errors, reported) = tokio::sync::mpsc::unbounded_channel();
        let addrs = server_addrs(&self.nats_url)?;
        let name_owned = name.to_string();
        let mut opts = auth
            .options()
            .await?
            .name(name)
            .custom_inbox_prefix(inbox)
            .connection_timeout(Duration::from_secs(3))
            .reconnect_delay_callback(bus::client::reconnect_delay)
            .subscription_capacity(16 * 1024)
            .event_callback(move |event| {
                let name = name_owned.clone();
                let errors = errors.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => tracing::info!(%name, "connected to NATS"),
                        async_nats::Event::Disconnected => {
                            tracing::warn!(%name, "disconnected from NATS; reconnecting")
                        }
                        async_nats::Event::SlowConsumer(sid) => {
                            tracing::warn!(%name, sid, "slow consumer: messages were dropped")
                        }
                        async_nats::Event::ServerError(e) => {
                            let text = e.to_string();
                            if text.contains("Permissions Violation for Publish to \"_INBOX.") {
                                // An answer the server did not let through: the requester
                                // asked from an inbox that is not its role's.
                                tracing::warn!(%name, error = %text, "{FOREIGN_INBOX}");
                            } else {
                                tracing::warn!(%name, error = %text, "NATS server error");
                            }
                            let _ = errors.send(text);
                        }
                        other => tracing::info!(%name, event = %other, "NATS event"),
                    }
                }
            });
        if retry {
            opts = opts.retry_on_initial_connect();
        } else {
            opts = opts.max_reconnects(Some(3));
        }
        let client = opts
            .connect(addrs)
            .await
            .map_err(|source| DaemonError::Connect {
                url: self.redacted_url(),
                source,
            })?;
        Ok((client, reported))
    }
}

/// What a responder logs when the server refuses its answer to an inbox: on the secured bus a
/// role answers only the inboxes of the roles that may ask it, `_INBOX.<prefix>.<role>.>`.
pub const FOREIGN_INBOX: &str = "an answer was refused by the server: the requester asked from \
     an inbox outside its role's (_INBOX.<prefix>.<role>), so it gets no answer; a client must \
     set its role's inbox prefix (docs/security.md, \"Clients of the engine\")";
