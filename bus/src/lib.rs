//! The policy-bus contract in code (see `docs/contract.md`): every subject, header, payload and merge
//! rule that crosses NATS is defined here and nowhere else, so that the dispatcher, the agents,
//! the CLI and third-party Rust hookpoints cannot drift apart.
#![forbid(unsafe_code)]

pub mod accounts;
pub mod admin;
mod admin_client;
pub mod attrs;
pub mod batch;
pub mod bucket;
pub mod cache;
pub mod client;
pub mod clusterlink;
pub mod codec;
pub mod config;
pub mod decision;
pub mod decisions;
pub mod discovery;
pub mod error;
pub mod event;
pub mod fleet;
pub mod headers;
pub mod hedge;
pub mod lasts;
pub mod leaf;
pub mod limits;
pub mod merge;
pub mod modules;
pub mod origin;
pub mod roles;
pub mod slots;
pub mod source;
pub mod state;
pub mod store;
pub mod streams;
pub mod subject;
pub mod tap;
pub mod transport;
pub mod watch;

pub use admin_client::AdminClient;
pub use client::{Client, ClientError};
pub use decision::{Action, ConnectionDecision, Effect, ExposeDecision, ListDecision, Reason};
pub use error::{ErrorCode, ErrorReply};
pub use event::{Direction, Event, EventName};
pub use state::{State, Value};
pub use subject::{Kind, Subjects};
