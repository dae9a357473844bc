//! The bridge as a cluster singleton: it runs on the oldest Up member with the [`BRIDGE_ROLE`],
//! consumes the queue and sends each message through that node's sharding producer. Told to
//! stop (a handover, a leave) it finishes and acks its in-flight work, then closes its channel;
//! started elsewhere, it begins where the broker's unacked deliveries left off.

use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::amqp::{AmqpSettings, AmqpSource, SourceSettings};
use crate::bridge::driver::{Bridge, BridgeError};
use crate::bridge::settings::BridgeSettings;
use crate::cluster::singleton::driver::SingletonSpec;
use crate::delivery::sharding::driver::ShardingProducerHandle;
use crate::entity::EntityMessage;
use crate::metrics::BridgeMetrics;

/// The role of nodes that may run the bridge singleton (the queue's one consumer).
pub const BRIDGE_ROLE: &str = "bridge";

/// The bridge singleton's name.
pub const BRIDGE_SINGLETON: &str = "amqp-bridge";

/// The bridge singleton of a node whose sending side is `producer`, consuming `amqp`'s queue
/// with the prefetch `settings` call for, under `connection_name`. `producer_stopped` is
/// cancelled when the node's producer has stopped and no instance of the bridge can deliver
/// from this node any more: the node should leave, so another takes the queue over. Any other
/// failure restarts the bridge here after a pause.
pub fn bridge_singleton<M>(
    settings: BridgeSettings,
    amqp: AmqpSettings,
    connection_name: String,
    producer: ShardingProducerHandle<M>,
    metrics: BridgeMetrics,
    producer_stopped: CancellationToken,
) -> SingletonSpec
where
    M: EntityMessage + Send + 'static,
{
    let source = SourceSettings {
        amqp,
        prefetch: settings.effective_prefetch(),
        connection_name,
    };
    SingletonSpec::new(BRIDGE_SINGLETON, BRIDGE_ROLE, move |stop| {
        let source = AmqpSource::spawn(source.clone(), metrics.source.clone());
        let bridge = Bridge::new(settings.clone(), source, producer.clone(), metrics.clone());
        let producer_stopped = producer_stopped.clone();
        async move {
            info!("this node consumes the queue now");
            match bridge.run(stop).await {
                Ok(()) => info!("this node stopped consuming the queue"),
                Err(error @ BridgeError::ProducerStopped) => {
                    error!(%error, "the bridge stopped");
                    producer_stopped.cancel();
                }
                Err(error) => error!(%error, "the bridge stopped; it starts again after a pause"),
            }
        }
    })
}
