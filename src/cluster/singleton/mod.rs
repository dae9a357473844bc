//! Cluster singletons: a named service that runs on exactly one node, the oldest Up member
//! with the service's role. [`core`] decides (sans IO); [`driver`] runs the instances.

pub mod core;
pub mod driver;

pub use core::{Placement, SingletonCore, SingletonEvent, SingletonMsg};

#[cfg(test)]
mod tests;
