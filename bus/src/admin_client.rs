//! The operator's client: the admin commands, over request/reply to the dispatchers.

use std::time::Duration;

use async_nats::HeaderMap;
use serde::{de::DeserializeOwned, Serialize};

use crate::admin::{self, Done, PolicyRef};
use crate::codec;
use crate::event;
use crate::state::Value;
use crate::subject::{AdminCommand, Subjects};
use crate::transport::{call, decode_reply, ClientError, DEFAULT_TIMEOUT};

/// An operator's client: programs subscriptions and policies through the dispatcher.
#[derive(Debug, Clone)]
pub struct AdminClient {
    nats: async_nats::Client,
    subjects: Subjects,
    timeout: Duration,
}

impl AdminClient {
    pub fn new(nats: async_nats::Client, subjects: Subjects) -> Self {
        AdminClient {
            nats,
            subjects,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The connection, for what the admin commands do not cover (the services API).
    pub fn nats(&self) -> &async_nats::Client {
        &self.nats
    }

    pub async fn command<A: Serialize, R: DeserializeOwned>(
        &self,
        command: AdminCommand,
        args: &A,
    ) -> Result<R, ClientError> {
        let subject = self.subjects.admin(command);
        let payload = codec::encode("admin command", args)?;
        let msg = call(
            &self.nats,
            subject.clone(),
            HeaderMap::new(),
            payload.into(),
            self.timeout,
        )
        .await?;
        decode_reply(&subject, &msg)
    }

    /// Subscribes a kind to an event. The dispatcher refuses a kind with no live instance and
    /// an event it does not know; see [`Self::subscribe_with`] to insist.
    pub async fn subscribe(&self, sub: &admin::Subscription) -> Result<(), ClientError> {
        self.subscribe_with(&admin::Subscribe::new(sub.clone(), false))
            .await
    }

    pub async fn subscribe_with(&self, args: &admin::Subscribe) -> Result<(), ClientError> {
        self.command::<_, Done>(AdminCommand::Subscribe, args)
            .await
            .map(drop)
    }

    pub async fn unsubscribe(&self, event: &str, agent: &str) -> Result<(), ClientError> {
        let args = admin::Unsubscribe {
            event: event::EventName::new(event)?,
            agent: agent.into(),
        };
        self.command::<_, Done>(AdminCommand::Unsubscribe, &args)
            .await
            .map(drop)
    }

    pub async fn subscriptions(
        &self,
        event: Option<&str>,
    ) -> Result<Vec<admin::Subscription>, ClientError> {
        Ok(self.subscriptions_by_level(event).await?.subscriptions)
    }

    /// The stored subscriptions, and at a site of a fleet the fleet's apart.
    pub async fn subscriptions_by_level(
        &self,
        event: Option<&str>,
    ) -> Result<admin::Subscriptions, ClientError> {
        let args = admin::ListSubscriptions {
            event: event.map(event::EventName::new).transpose()?,
        };
        self.command(AdminCommand::Subscriptions, &args).await
    }

    /// Adds policies; returns every document's ref, written or unchanged.
    pub async fn policy_add(&self, policies: Vec<Value>) -> Result<Vec<PolicyRef>, ClientError> {
        let r = self.policy_add_detailed(policies).await?;
        Ok(r.stored.into_iter().chain(r.unchanged).collect())
    }

    /// Adds policies, saying which were written and which were already stored as given.
    pub async fn policy_add_detailed(
        &self,
        policies: Vec<Value>,
    ) -> Result<admin::PolicyAdded, ClientError> {
        // Validating up to `MAX_POLICIES_PER_ADD` documents takes their agents a while.
        self.slow()
            .command(AdminCommand::PolicyAdd, &admin::PolicyAdd { policies })
            .await
    }

    pub async fn policy_remove(&self, agent: &str, id: &str) -> Result<(), ClientError> {
        let args = admin::PolicyRemove {
            agent: agent.into(),
            id: id.into(),
        };
        self.command::<_, Done>(AdminCommand::PolicyRemove, &args)
            .await
            .map(drop)
    }

    pub async fn policy_list(&self, agent: Option<&str>) -> Result<Vec<Value>, ClientError> {
        Ok(self.policy_list_by_level(agent).await?.policies)
    }

    /// The stored policies, and at a site of a fleet the fleet's apart.
    pub async fn policy_list_by_level(
        &self,
        agent: Option<&str>,
    ) -> Result<admin::Policies, ClientError> {
        let args = admin::PolicyList {
            agent: agent.map(str::to_owned),
        };
        // A bulk-loaded store holds thousands of policies, each read on its own.
        self.slow().command(AdminCommand::PolicyList, &args).await
    }

    /// Makes the stored configuration equal `args` (see [`admin::Apply`]). Validating a large
    /// set takes its agents a while, so this waits longer than the other commands.
    pub async fn apply(&self, args: &admin::Apply) -> Result<admin::Applied, ClientError> {
        self.slow().command(AdminCommand::Apply, args).await
    }

    /// This client, waiting as long as a bulk command may take.
    fn slow(&self) -> AdminClient {
        AdminClient {
            timeout: APPLY_TIMEOUT,
            ..self.clone()
        }
    }

    /// The configuration revision and what is stored.
    pub async fn status(&self) -> Result<admin::Status, ClientError> {
        self.command(AdminCommand::Status, &admin::StatusArgs {})
            .await
    }
}

impl AdminClient {
    /// Stores a WebAssembly module as agent kind `kind` (see [`admin::AgentDeploy`]).
    pub async fn agent_deploy(
        &self,
        kind: &str,
        module: Vec<u8>,
        force: bool,
    ) -> Result<admin::Module, ClientError> {
        let args = admin::AgentDeploy {
            kind: kind.into(),
            module,
            force,
        };
        self.command(AdminCommand::AgentDeploy, &args).await
    }

    /// Unloads kind `kind` from every wasm host.
    pub async fn agent_remove(&self, kind: &str) -> Result<(), ClientError> {
        let args = admin::AgentRemove { kind: kind.into() };
        self.command::<_, Done>(AdminCommand::AgentRemove, &args)
            .await
            .map(drop)
    }

    pub async fn agent_list(&self) -> Result<Vec<admin::Module>, ClientError> {
        let r: admin::Modules = self
            .command(AdminCommand::AgentList, &admin::AgentListArgs {})
            .await?;
        Ok(r.modules)
    }
}

/// How long `apply` may take: up to 1000 documents, each validated by its agent kind.
const APPLY_TIMEOUT: Duration = Duration::from_secs(30);
