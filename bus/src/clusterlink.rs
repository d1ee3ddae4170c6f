//! ClusterLink's events beyond the seed three (see the event table of docs/contract.md):
//! a live connection's status, peers joining and leaving, and remote services
//! offered and withdrawn. Typed like the v1 events: missing or ill-typed fields are errors,
//! unknown extra fields are ignored.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub const CONNECTION_STATUS: &str = "connection-status";
pub const PEER_ADDED: &str = "peer-added";
pub const PEER_REMOVED: &str = "peer-removed";
pub const REMOTE_SERVICE_ADDED: &str = "remote-service-added";
pub const REMOTE_SERVICE_REMOVED: &str = "remote-service-removed";

/// Labels of a workload, service or peer (see [`crate::event::Labels`]).
type Labels = BTreeMap<String, String>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnectionState {
    Open,
    Closed,
    Failed,
}

/// A gateway's periodic report on a connection it admitted. `bytes_in` and `bytes_out` are
/// totals since the connection opened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionStatus {
    pub connection_id: String,
    pub state: ConnectionState,
    #[serde(default)]
    pub bytes_in: u64,
    #[serde(default)]
    pub bytes_out: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_peer: Option<String>,
    /// Not in ClusterLink's report; a gateway may add them, else the monitor finds them from
    /// the connection's admission.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_service: Option<String>,
}

/// `peer-added` and `peer-removed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerChange {
    pub peer: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Labels>,
}

/// `remote-service-added` and `remote-service-removed`: a service a peer offers. For
/// `remote-service-added` the decision's `action` says whether to import it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteService {
    pub service: String,
    pub peer: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Labels>,
}
