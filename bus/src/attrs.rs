//! The names of event attributes, as hookpoints send them and agents, the verdict cache and
//! the monitor read them by name: spelled here once (the typed events in [`crate::event`]
//! carry the same names as their fields).

pub const SRC_SERVICE: &str = "src_service";
pub const DST_SERVICE: &str = "dst_service";
pub const SRC_PEER: &str = "src_peer";
pub const DIRECTION: &str = "direction";
pub const CONNECTION_ID: &str = "connection_id";
pub const TARGET_PEER: &str = "target_peer";
pub const SERVICE: &str = "service";
pub const PEER: &str = "peer";
pub const LABELS: &str = "labels";
pub const SRC_LABELS: &str = "src_labels";
pub const DST_LABELS: &str = "dst_labels";
pub const PEER_LABELS: &str = "peer_labels";
pub const SERVICE_LABELS: &str = "service_labels";
pub const SRC_PEER_LABELS: &str = "src_peer_labels";
pub const NAMESPACE: &str = "namespace";
/// The candidate lists an event may offer: `new-connection`'s peers, `expose-service`'s
/// peers, `service-list-request`'s services. They seed the state's candidates.
pub const DST_PEERS: &str = "dst_peers";
pub const PEERS: &str = "peers";
pub const SERVICES: &str = "services";
pub const CANDIDATES: [&str; 3] = [DST_PEERS, PEERS, SERVICES];
