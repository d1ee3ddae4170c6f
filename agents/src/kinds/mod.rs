//! The agent kinds shipped with policy-bus. Others, in any language, join by subscription.

pub mod acl;
pub mod conn_limit;
mod conn_slots;
mod conn_store;
pub mod lb;
pub mod limit_match;
pub mod monitor;
pub mod rate;
pub mod rate_keys;
pub mod rate_limit;
pub mod rate_pool;
pub mod wasm;
