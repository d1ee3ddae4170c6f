//! `<prefix>.admin.<command>`: each command, decoded, to the module that carries it out.
//! Here rather than in `admin`, so that `apply` and `modules`, which use what `admin` shares,
//! are not imported back by it.

use bus::admin::Request;
use bus::ErrorReply;
use bytes::Bytes;

use crate::{admin, apply, modules, Dispatcher};

pub async fn handle(d: &Dispatcher, command: &str, payload: &[u8]) -> Result<Bytes, ErrorReply> {
    match Request::decode(command, payload)? {
        Request::Subscribe(a) => admin::subscribe(d, a).await,
        Request::Unsubscribe(a) => admin::unsubscribe(d, a).await,
        Request::Subscriptions(a) => admin::subscriptions(d, a).await,
        Request::PolicyAdd(a) => apply::policy_add(d, a).await,
        Request::PolicyRemove(a) => admin::policy_remove(d, a).await,
        Request::PolicyList(a) => admin::policy_list(d, a).await,
        Request::Apply(a) => apply::apply(d, a).await,
        Request::Status(_) => apply::status(d).await,
        Request::AgentDeploy(a) => modules::deploy(d, a).await,
        Request::AgentRemove(a) => modules::remove(d, a).await,
        Request::AgentList(_) => modules::list(d).await,
    }
}
