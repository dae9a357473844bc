//! The cluster: who is in it ([`membership`]: chitchat gossip with phi-accrual failure
//! detection over authenticated UDP), how nodes talk ([`transport`]: authenticated TCP links
//! carrying framed messages), and what runs once in the whole cluster ([`singleton`]).
//! Sharding builds on these three; [`member`] holds the vocabulary they share.

pub mod auth;
pub mod context;
pub mod lease;
pub mod member;
pub mod membership;
pub mod metrics;
pub mod singleton;
pub mod transport;

pub use auth::{ClusterSecret, Security};
pub use context::NodeContext;
pub use member::{ClusterView, Member, MemberStatus, NodeAddr, NodeId};
pub use metrics::ClusterMetrics;
