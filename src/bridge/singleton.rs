//! The bridge as a cluster singleton: it runs on an Up member with the [`BRIDGE_ROLE`],
//! consumes the queue and sends each message through that node's sharding producer. Told to
//! stop (a handover, a leave) it finishes and acks its in-flight work, then closes its channel;
//! started elsewhere, it begins where the broker's unacked deliveries left off.
//!
//! A partitioned queue has one bridge singleton per partition queue, ranked so that they
//! spread over the members with the role (partition `i` on the `i`-th oldest, counting round):
//! each keeps its own channel, prefetch and in-flight bound, and moves with the same handover.

use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::amqp::{AmqpSettings, AmqpSource, SourceSettings};
use crate::bridge::driver::{Bridge, BridgeError};
use crate::bridge::settings::BridgeSettings;
use crate::cluster::singleton::driver::SingletonSpec;
use crate::delivery::sharding::driver::ShardingProducerHandle;
use crate::entity::EntityMessage;
use crate::metrics::BridgeSeries;

/// The role of nodes that may run the bridge singletons (the queues' consumers).
pub const BRIDGE_ROLE: &str = "bridge";

/// The bridge singleton's name when the queue has no partitions.
pub const BRIDGE_SINGLETON: &str = "amqp-bridge";

/// The name of the bridge singleton of `partition` among `partitions`: [`BRIDGE_SINGLETON`]
/// for an unpartitioned queue, else `amqp-bridge-<partition>`.
pub fn bridge_singleton_name(partitions: u16, partition: u16) -> String {
    if partitions <= 1 {
        BRIDGE_SINGLETON.to_owned()
    } else {
        format!("{BRIDGE_SINGLETON}-{partition}")
    }
}

/// The bridge singletons of a node whose sending side is `producer`: one per source queue of
/// `amqp`, each consuming with the prefetch `settings` call for, under `connection_name`
/// (suffixed `-p<i>` per partition). `producer_stopped` is cancelled when the node's producer
/// has stopped and no bridge can deliver from this node any more: the node should leave, so
/// another takes the queues over. Any other failure restarts that bridge here after a pause.
pub fn bridge_singletons<M>(
    settings: BridgeSettings,
    amqp: AmqpSettings,
    connection_name: String,
    producer: ShardingProducerHandle<M>,
    metrics: BridgeSeries,
    producer_stopped: CancellationToken,
) -> Vec<SingletonSpec>
where
    M: EntityMessage + Send + 'static,
{
    let partitions = amqp.partitions;
    amqp.source_queues()
        .into_iter()
        .zip(0u16..)
        .map(|(queue, partition)| {
            let source = SourceSettings {
                amqp: amqp.clone(),
                queue,
                prefetch: settings.effective_prefetch(),
                connection_name: if partitions <= 1 {
                    connection_name.clone()
                } else {
                    format!("{connection_name}-p{partition}")
                },
            };
            let name = bridge_singleton_name(partitions, partition);
            let (settings, producer) = (settings.clone(), producer.clone());
            let (metrics, producer_stopped) =
                (metrics.partition(partition), producer_stopped.clone());
            SingletonSpec::new(name, BRIDGE_ROLE, move |stop| {
                let source = AmqpSource::spawn(source.clone(), metrics.source.clone());
                let bridge =
                    Bridge::new(settings.clone(), source, producer.clone(), metrics.clone());
                let producer_stopped = producer_stopped.clone();
                async move {
                    info!(partition, "this node consumes the queue now");
                    match bridge.run(stop).await {
                        Ok(()) => info!(partition, "this node stopped consuming the queue"),
                        Err(error @ BridgeError::ProducerStopped) => {
                            error!(partition, %error, "the bridge stopped");
                            producer_stopped.cancel();
                        }
                        Err(error) => error!(
                            partition,
                            %error,
                            "the bridge stopped; it starts again after a pause"
                        ),
                    }
                }
            })
            .at_rank(usize::from(partition))
        })
        .collect()
}
