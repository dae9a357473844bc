//! `[cluster]`: who this node is, where it listens, whom it joins, and how each cluster layer
//! behaves. Validation names the offending key; a node that would accept unauthenticated
//! peers without being told to (`insecure`) does not start.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::bridge::BRIDGE_ROLE;
use crate::cluster::auth::{ClusterSecret, Security};
use crate::cluster::lease::{Lease, PostgresLease};
use crate::cluster::membership::MembershipSettings;
use crate::cluster::membership::downing::{DowningSettings, Strategy};
use crate::cluster::transport::{ClusterTlsSettings, LinkTls, TransportSettings};
use crate::config::{ConfigError, check};
use crate::entity::store::StoreLocation;
use crate::sharding::{CoordinatorSettings, RegionSettings};

/// The role of nodes that host shards (and may run the shard coordinator).
pub const SHARD_HOST_ROLE: &str = "shard-host";

/// One node's cluster settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSettings {
    /// This node's name, unique in the cluster and stable across restarts.
    pub node_id: String,
    /// Cluster address: TCP (links) and UDP (gossip) on the same port. Must be an address
    /// the other nodes can reach, not 0.0.0.0; port 0 (a free port) suits only a node without
    /// seeds that nobody joins.
    pub listen: SocketAddr,
    /// Cluster addresses of nodes to join through; empty forms a new cluster of one. Only the
    /// node listed first (on every node, the same first) may form a cluster; the others only
    /// join one.
    pub seeds: Vec<String>,
    /// What this node may run: `shard-host` hosts entities.
    pub roles: Vec<String>,
    /// Nodes of differently named clusters ignore each other.
    pub cluster_name: String,
    /// Shared secret every node must hold (16 bytes or more).
    pub secret: Option<String>,
    /// Accept peers without a secret. Only for a trusted, closed network.
    pub insecure: bool,
    /// Time between gossip rounds.
    #[serde(with = "humantime_serde")]
    pub gossip_interval: Duration,
    /// Failure-detector threshold.
    pub phi_threshold: f64,
    /// A silent member counts as unreachable after this long; `downing` decides when it is down.
    #[serde(with = "humantime_serde")]
    pub down_after: Duration,
    /// Which side of a network partition survives (`[cluster.downing]`).
    pub downing: DowningConfig,
    /// The first seed forms the cluster if it meets no Up member by then.
    #[serde(with = "humantime_serde")]
    pub join_timeout: Duration,
    /// When the first seed is a DNS name for every node (a headless Service), the addresses
    /// it must resolve to before the lowest of them may form the cluster.
    pub required_seed_addresses: usize,
    /// Any other node that has not joined by then gives up and exits; `off` waits forever.
    #[serde(with = "duration_or_off")]
    pub give_up_joining_after: Option<Duration>,
    /// How long a leaving node waits for its shards and singletons to move.
    #[serde(with = "humantime_serde")]
    pub leave_timeout: Duration,
    /// Node-to-node links.
    pub transport: TransportSettings,
    /// Mutual TLS on node-to-node links (`[cluster.tls]`); gossip stays signed by `secret`.
    pub tls: ClusterTlsSettings,
    /// Shard regions.
    pub region: RegionSettings,
    /// The shard coordinator.
    pub coordinator: CoordinatorSettings,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        let membership = MembershipSettings::default();
        ClusterSettings {
            node_id: "node-1".to_owned(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            seeds: Vec::new(),
            roles: vec![SHARD_HOST_ROLE.to_owned(), BRIDGE_ROLE.to_owned()],
            cluster_name: membership.cluster_name,
            secret: None,
            insecure: false,
            gossip_interval: membership.gossip_interval,
            phi_threshold: membership.phi_threshold,
            down_after: membership.down_after,
            downing: DowningConfig::default(),
            join_timeout: membership.join_timeout,
            required_seed_addresses: membership.required_seed_addresses,
            give_up_joining_after: membership.give_up_after,
            leave_timeout: Duration::from_secs(30),
            transport: TransportSettings::default(),
            tls: ClusterTlsSettings::default(),
            region: RegionSettings::default(),
            coordinator: CoordinatorSettings::default(),
        }
    }
}

impl ClusterSettings {
    /// Rejects values the cluster cannot run with, naming the key under `prefix`.
    pub fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        check(
            !self.node_id.is_empty() && !self.node_id.contains(char::is_whitespace),
            prefix,
            "node_id",
            "must be a non-empty name without spaces",
        )?;
        check(
            !self.listen.ip().is_unspecified()
                && (self.listen.port() != 0 || self.seeds.is_empty()),
            prefix,
            "listen",
            "must be an address other nodes can reach, with a port (port 0 only for a node that joins nobody)",
        )?;
        check(
            self.region.shards > 0,
            prefix,
            "region.shards",
            "must be at least 1",
        )?;
        check(
            self.region.max_active_entities > 0,
            prefix,
            "region.max_active_entities",
            "must be at least 1",
        )?;
        check(
            self.transport.max_frame_bytes >= 1024,
            prefix,
            "transport.max_frame_bytes",
            "must be at least 1024",
        )?;
        check(
            self.gossip_interval >= Duration::from_millis(10),
            prefix,
            "gossip_interval",
            "must be at least 10ms",
        )?;
        check(
            self.down_after >= self.gossip_interval,
            prefix,
            "down_after",
            "must be at least gossip_interval",
        )?;
        self.downing.validate(prefix, self.gossip_interval)?;
        check(
            self.give_up_joining_after
                .is_none_or(|limit| limit > self.join_timeout),
            prefix,
            "give_up_joining_after",
            "must be longer than join_timeout (or off)",
        )?;
        check(
            self.required_seed_addresses >= 1,
            prefix,
            "required_seed_addresses",
            "must be at least 1",
        )?;
        check(
            self.phi_threshold > 0.0,
            prefix,
            "phi_threshold",
            "must be positive",
        )?;
        if let Some(secret) = &self.secret {
            check(
                ClusterSecret::new(secret).is_ok(),
                prefix,
                "secret",
                "must be at least 16 bytes",
            )?;
        }
        self.tls.validate(prefix)?;
        check(
            self.secret.is_some() || self.insecure || self.seeds.is_empty(),
            prefix,
            "secret",
            "joining a cluster needs a shared secret (or `--insecure` / `insecure = true` on a trusted network)",
        )
    }

    /// The TLS ends of this node's links, or `None` without `[cluster.tls]`; call after
    /// [`Self::validate`].
    pub fn link_tls(&self) -> Result<Option<Arc<LinkTls>>, ConfigError> {
        self.tls.build().map_err(|e| ConfigError::OutOfRange {
            key: format!("cluster.{}", e.key),
            reason: e.source.to_string(),
        })
    }

    /// How this node authenticates peers; call after [`Self::validate`].
    pub fn security(&self) -> Result<Security, ConfigError> {
        match &self.secret {
            Some(secret) => ClusterSecret::new(secret)
                .map(Security::Secret)
                .map_err(|e| ConfigError::OutOfRange {
                    key: "cluster.secret".to_owned(),
                    reason: e.to_string(),
                }),
            None if self.insecure => Ok(Security::Insecure),
            None => Ok(Security::Standalone),
        }
    }

    /// The membership part.
    pub fn membership(&self) -> MembershipSettings {
        MembershipSettings {
            cluster_name: self.cluster_name.clone(),
            seeds: self.seeds.clone(),
            gossip_interval: self.gossip_interval,
            phi_threshold: self.phi_threshold,
            down_after: self.down_after,
            downing: self.downing.settings(),
            join_timeout: self.join_timeout,
            required_seed_addresses: self.required_seed_addresses,
            give_up_after: self.give_up_joining_after,
            ..MembershipSettings::default()
        }
    }
}

/// Longest a downing setting may wait: beyond it a partition is an outage anyway.
const MAX_DOWNING_WAIT: Duration = Duration::from_secs(3600);

/// `[cluster.downing]`: the split-brain resolver's rule and timing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DowningConfig {
    /// `keep-majority`, `static-quorum` (with `quorum_size`), `keep-oldest`,
    /// `lease-majority` (with `lease_url`), or `off`.
    pub strategy: StrategyName,
    /// Members a side needs to stay, for `static-quorum`: more than half the cluster's size.
    pub quorum_size: Option<usize>,
    /// For `keep-oldest`: an oldest member cut off alone from two or more others goes.
    pub down_if_alone: bool,
    /// How long the unreachable set must not change before the strategy decides.
    #[serde(with = "humantime_serde")]
    pub stable_after: Duration,
    /// How much longer the surviving side waits before it takes the other side's work over
    /// (the other side has downed itself by then).
    #[serde(with = "humantime_serde")]
    pub down_removal_margin: Duration,
    /// For `lease-majority`: the PostgreSQL database holding the lease (`warren-consumer`
    /// uses its `entity_store` when that is one).
    pub lease_url: Option<String>,
    /// For `lease-majority`: how long the side keep-majority would not keep waits before it
    /// asks for the lease.
    #[serde(with = "humantime_serde")]
    pub acquire_lease_delay_for_minority: Duration,
}

/// The downing strategies by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StrategyName {
    /// The side with more than half the members stays.
    KeepMajority,
    /// A side with `quorum_size` members or more stays.
    StaticQuorum,
    /// The side with the oldest member stays.
    KeepOldest,
    /// The side that gets a lease in PostgreSQL stays.
    LeaseMajority,
    /// No resolver (both sides of a partition go on: unsafe).
    Off,
}

impl Default for DowningConfig {
    fn default() -> Self {
        let settings = DowningSettings::default();
        DowningConfig {
            strategy: StrategyName::KeepMajority,
            quorum_size: None,
            down_if_alone: true,
            stable_after: settings.stable_after,
            down_removal_margin: settings.down_removal_margin,
            lease_url: None,
            acquire_lease_delay_for_minority: Duration::from_secs(2),
        }
    }
}

impl DowningConfig {
    fn validate(&self, prefix: &str, gossip_interval: Duration) -> Result<(), ConfigError> {
        let quorum = self.quorum_size.unwrap_or(0);
        match self.strategy {
            StrategyName::StaticQuorum => check(
                quorum >= 1,
                prefix,
                "downing.quorum_size",
                "must be set (at least 1, and more than half the cluster) for static-quorum",
            )?,
            _ => check(
                self.quorum_size.is_none(),
                prefix,
                "downing.quorum_size",
                "is only used by the static-quorum strategy",
            )?,
        }
        if self.strategy == StrategyName::LeaseMajority {
            let url = self.lease_url.as_deref().unwrap_or("");
            check(
                matches!(StoreLocation::parse(url), Ok(StoreLocation::Postgres(_))),
                prefix,
                "downing.lease_url",
                "must be a postgres:// URL for lease-majority (warren-consumer uses a postgres entity_store)",
            )?;
        }
        check(
            self.stable_after >= gossip_interval && self.stable_after <= MAX_DOWNING_WAIT,
            prefix,
            "downing.stable_after",
            "must be at least gossip_interval, and at most an hour",
        )?;
        check(
            self.down_removal_margin >= gossip_interval * 2
                && self.down_removal_margin <= MAX_DOWNING_WAIT,
            prefix,
            "downing.down_removal_margin",
            "must be at least twice gossip_interval (the losing side needs time to go), and at most an hour",
        )?;
        check(
            self.acquire_lease_delay_for_minority <= MAX_DOWNING_WAIT,
            prefix,
            "downing.acquire_lease_delay_for_minority",
            "must be at most an hour",
        )
    }

    /// The lease `lease-majority` asks for, named after the cluster; call after validation.
    pub fn lease(&self, cluster_name: &str) -> Result<Option<Arc<dyn Lease>>, ConfigError> {
        if self.strategy != StrategyName::LeaseMajority {
            return Ok(None);
        }
        let url = self.lease_url.as_deref().unwrap_or("");
        let lease = PostgresLease::new(url, cluster_name).map_err(|e| ConfigError::OutOfRange {
            key: "cluster.downing.lease_url".to_owned(),
            reason: e.to_string(),
        })?;
        Ok(Some(Arc::new(lease)))
    }

    /// The resolver's settings; call after validation.
    pub fn settings(&self) -> DowningSettings {
        let strategy = match self.strategy {
            StrategyName::KeepMajority => Strategy::KeepMajority,
            StrategyName::StaticQuorum => Strategy::StaticQuorum {
                quorum_size: self.quorum_size.unwrap_or(1),
            },
            StrategyName::KeepOldest => Strategy::KeepOldest {
                down_if_alone: self.down_if_alone,
            },
            StrategyName::LeaseMajority => Strategy::LeaseMajority {
                delay_for_minority: self.acquire_lease_delay_for_minority,
            },
            StrategyName::Off => Strategy::Off,
        };
        DowningSettings {
            strategy,
            stable_after: self.stable_after,
            down_removal_margin: self.down_removal_margin,
        }
    }
}

/// `off`, or a duration such as `5m` or `90s`.
mod duration_or_off {
    use std::time::Duration;

    use humantime_serde::re::humantime;
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    const OFF: &str = "off";

    pub(super) fn serialize<S: Serializer>(
        value: &Option<Duration>,
        out: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            None => out.serialize_str(OFF),
            Some(duration) => out.serialize_str(&humantime::format_duration(*duration).to_string()),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        input: D,
    ) -> Result<Option<Duration>, D::Error> {
        let text = String::deserialize(input)?;
        if text.trim() == OFF {
            return Ok(None);
        }
        humantime::parse_duration(text.trim())
            .map(Some)
            .map_err(|e| D::Error::custom(format!("{e}: expected `off` or a duration such as 5m")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(error: ConfigError) -> String {
        match error {
            ConfigError::OutOfRange { key, .. } => key,
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn joining_without_a_secret_needs_insecure() {
        let mut settings = ClusterSettings {
            listen: "127.0.0.1:7350".parse().unwrap(),
            seeds: vec!["127.0.0.1:7351".to_owned()],
            ..ClusterSettings::default()
        };
        let error = settings.validate("cluster").unwrap_err();
        assert_eq!(key_of(error), "cluster.secret");
        settings.insecure = true;
        settings.validate("cluster").unwrap();
        assert!(matches!(settings.security().unwrap(), Security::Insecure));
        settings.insecure = false;
        settings.secret = Some("0123456789abcdef".to_owned());
        settings.validate("cluster").unwrap();
        assert!(matches!(settings.security().unwrap(), Security::Secret(_)));
    }

    #[test]
    fn bad_values_name_their_key() {
        type Spoil = fn(&mut ClusterSettings);
        let cases: [(&str, Spoil); 14] = [
            ("cluster.secret", |s| s.secret = Some("short".to_owned())),
            ("cluster.listen", |s| {
                s.listen = "0.0.0.0:7350".parse().unwrap()
            }),
            // Nobody could join a node whose port is picked at random.
            ("cluster.listen", |s| {
                s.secret = Some("0123456789abcdef".to_owned());
                s.seeds = vec!["127.0.0.1:7351".to_owned()];
            }),
            ("cluster.node_id", |s| s.node_id = "a b".to_owned()),
            ("cluster.region.shards", |s| s.region.shards = 0),
            ("cluster.region.max_active_entities", |s| {
                s.region.max_active_entities = 0
            }),
            ("cluster.down_after", |s| s.down_after = Duration::ZERO),
            ("cluster.give_up_joining_after", |s| {
                s.give_up_joining_after = Some(s.join_timeout)
            }),
            ("cluster.downing.quorum_size", |s| {
                s.downing.strategy = StrategyName::StaticQuorum
            }),
            ("cluster.downing.quorum_size", |s| {
                s.downing.quorum_size = Some(2)
            }),
            ("cluster.downing.stable_after", |s| {
                s.downing.stable_after = Duration::ZERO
            }),
            ("cluster.downing.lease_url", |s| {
                s.downing.strategy = StrategyName::LeaseMajority
            }),
            ("cluster.downing.down_removal_margin", |s| {
                s.downing.down_removal_margin = Duration::ZERO
            }),
            ("cluster.downing.stable_after", |s| {
                s.downing.stable_after = Duration::from_secs(u64::MAX / 4)
            }),
        ];
        for (key, spoil) in cases {
            let mut settings = ClusterSettings::default();
            spoil(&mut settings);
            assert_eq!(key_of(settings.validate("cluster").unwrap_err()), key);
        }
        assert!(matches!(
            ClusterSettings::default().security().unwrap(),
            Security::Standalone
        ));
    }

    #[test]
    fn giving_up_joining_reads_off_or_a_duration() {
        let read = |text: &str| {
            figment::Figment::from(figment::providers::Serialized::defaults(
                ClusterSettings::default(),
            ))
            .merge(<figment::providers::Toml as figment::providers::Format>::string(text))
            .extract::<ClusterSettings>()
            .map_err(|e| e.to_string())
        };
        assert_eq!(
            read("give_up_joining_after = \"off\"")
                .unwrap()
                .give_up_joining_after,
            None
        );
        assert_eq!(
            read("give_up_joining_after = \"90s\"")
                .unwrap()
                .give_up_joining_after,
            Some(Duration::from_secs(90))
        );
        let error = read("give_up_joining_after = \"soon\"").unwrap_err();
        assert!(
            error.to_string().contains("give_up_joining_after"),
            "{error}"
        );
        assert_eq!(
            read("").unwrap().give_up_joining_after,
            Some(Duration::from_secs(300)),
            "a few minutes by default"
        );
    }
}
