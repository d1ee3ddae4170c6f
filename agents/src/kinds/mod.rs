//! The agent kinds shipped with policy-bus. Others, in any language, join by subscription.

pub mod acl;
pub mod lb;
