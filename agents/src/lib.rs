//! Policy agents: one runtime ([`runtime`]) shared by every kind, and the kinds shipped with
//! policy-bus ([`kinds`]). A kind is a pure module (policy type with validation, decide) that
//! is unit-testable without NATS.
#![forbid(unsafe_code)]

pub mod clusterlink;
pub mod kind;
pub mod kinds;
pub mod label;
pub mod metrics;
pub mod pattern;
pub mod runtime;
pub mod selector;

pub use kind::AgentKind;
