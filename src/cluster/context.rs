//! What every part of a node needs from the node it runs in: who it is, the membership view,
//! where its metrics go and when it must stop. Built once by the node and passed by reference
//! to each part it starts, instead of the same four values threaded through every spawner.

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cluster::member::{ClusterView, NodeAddr};
use crate::cluster::metrics::ClusterMetrics;

/// The node a part runs in.
#[derive(Clone)]
pub struct NodeContext {
    /// This run of the node.
    pub me: NodeAddr,
    /// The membership view, updated as it changes.
    pub view: watch::Receiver<ClusterView>,
    /// The node's cluster metrics.
    pub metrics: ClusterMetrics,
    /// Cancelled when the node stops; each part stops on a child of it.
    pub shutdown: CancellationToken,
}

impl NodeContext {
    /// A token that stops one part when the node stops, or earlier if the part is cancelled
    /// on its own.
    pub fn part_shutdown(&self) -> CancellationToken {
        self.shutdown.child_token()
    }
}
