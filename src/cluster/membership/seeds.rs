//! The seed list, resolved: which [`SeedRole`] this node has and which addresses it probes.
//! A seed is `host:port`, and a host may be a DNS name that resolves to several nodes (a
//! Kubernetes headless Service names every pod): each address is a seed then. Of the first
//! entry's addresses the lowest is the one that may form the cluster, once that entry resolves
//! to at least `required_seed_addresses` of them (Akka Cluster Bootstrap's "lowest address
//! forms, once enough contact points are found"), so nodes that see the same answer agree on
//! one former. While this node joins, the list is resolved again every probe round: pods
//! appear in DNS as they start.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::cluster::auth::Security;
use crate::cluster::member::NodeAddr;
use crate::cluster::membership::join::{JoinState, SeedRole};
use crate::cluster::transport::probe::{ProbeOutcome, probe};
use crate::cluster::transport::tls::LinkTls;

/// First pause between two rounds of seed probes; it doubles up to [`PROBE_PAUSE_MAX`].
const PROBE_PAUSE_MIN: Duration = Duration::from_secs(1);
/// Longest pause between two rounds of seed probes.
const PROBE_PAUSE_MAX: Duration = Duration::from_secs(30);
/// How long one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// One seed entry and what it resolved to: addresses, or why none.
pub type Resolution = (String, Result<Vec<SocketAddr>, String>);

/// What a resolution of the seed list means for this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeedAssessment {
    /// May this node form the cluster?
    pub role: SeedRole,
    /// The other seeds, each as its label (the entry, with the address when the entry names
    /// several) and the address to probe, or why there is none.
    pub targets: Vec<(String, Result<SocketAddr, String>)>,
}

impl SeedAssessment {
    /// The labels of [`Self::targets`].
    pub fn labels(&self) -> Vec<String> {
        self.targets
            .iter()
            .map(|(label, _)| label.clone())
            .collect()
    }
}

/// Decides from `resolved` (the entries in configured order) for the node at `me`.
pub fn assess(resolved: &[Resolution], me: SocketAddr, required: usize) -> SeedAssessment {
    let role = match resolved.first() {
        None => SeedRole::Alone,
        Some((_, Ok(first))) => {
            let lowest = first.iter().min();
            if lowest == Some(&me) && first.len() >= required {
                SeedRole::FirstSeed
            } else {
                SeedRole::Joiner
            }
        }
        Some((_, Err(_))) => SeedRole::Joiner,
    };
    let mut targets = Vec::new();
    for (entry, outcome) in resolved {
        match outcome {
            Err(why) => targets.push((entry.clone(), Err(why.clone()))),
            Ok(addrs) if addrs.is_empty() => {
                targets.push((entry.clone(), Err("resolves to no address".to_owned())));
            }
            Ok(addrs) => {
                for addr in addrs.iter().filter(|addr| **addr != me) {
                    let label = if addrs.len() == 1 {
                        entry.clone()
                    } else {
                        format!("{entry} ({addr})")
                    };
                    targets.push((label, Ok(*addr)));
                }
            }
        }
    }
    SeedAssessment { role, targets }
}

/// Looks every entry up, keeping the order of entries and sorting each one's addresses.
pub async fn resolve(seeds: &[String]) -> Vec<Resolution> {
    let mut resolved = Vec::with_capacity(seeds.len());
    for seed in seeds {
        let outcome = match tokio::net::lookup_host(seed.as_str()).await {
            Ok(addrs) => {
                let mut addrs: Vec<SocketAddr> = addrs.collect();
                addrs.sort();
                addrs.dedup();
                Ok(addrs)
            }
            Err(error) => Err(format!("does not resolve: {error}")),
        };
        resolved.push((seed.clone(), outcome));
    }
    resolved
}

/// What the prober tells the membership tracker.
#[derive(Debug)]
pub enum SeedEvent {
    /// The list resolved anew: the role, and the seeds there are now.
    Resolved(SeedRole, Vec<String>),
    /// What one probe found.
    Probed(String, ProbeOutcome),
}

/// The prober's part of a node that joins: who it is and how it proves it.
pub struct Prober {
    /// This node's seed list, as configured.
    pub seeds: Vec<String>,
    /// Where this node listens.
    pub me_at: SocketAddr,
    /// This node.
    pub me: NodeAddr,
    /// How many addresses the first seed must resolve to before its lowest may form.
    pub required: usize,
    /// The handshake's secret.
    pub security: Security,
    /// TLS around the probe, as around links.
    pub tls: Option<Arc<LinkTls>>,
}

impl Prober {
    /// Resolves and probes the seeds, round after round with backoff, while this node is
    /// joining, and tells the tracker (gossip alone cannot tell a dead seed from one that
    /// refuses our secret: chitchat drops both silently).
    pub async fn run(self, mut join: watch::Receiver<JoinState>, events: mpsc::Sender<SeedEvent>) {
        let mut pauses = crate::backoff::jittered(PROBE_PAUSE_MIN, PROBE_PAUSE_MAX);
        while matches!(*join.borrow(), JoinState::Joining(_)) {
            let assessment = assess(&resolve(&self.seeds).await, self.me_at, self.required);
            let resolved = SeedEvent::Resolved(assessment.role, assessment.labels());
            if events.send(resolved).await.is_err() {
                return;
            }
            for (label, target) in assessment.targets {
                let outcome = match target {
                    Ok(addr) => {
                        let tls = self.tls.as_deref();
                        probe(addr, &self.me, &self.security, tls, PROBE_TIMEOUT).await
                    }
                    Err(why) => ProbeOutcome::Unreachable(why),
                };
                if events
                    .send(SeedEvent::Probed(label, outcome))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            let pause = pauses.next().unwrap_or(PROBE_PAUSE_MAX);
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                changed = join.changed() => if changed.is_err() { return },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn entry(name: &str, addrs: &[&str]) -> Resolution {
        (name.to_owned(), Ok(addrs.iter().map(|a| at(a)).collect()))
    }

    #[test]
    fn a_list_of_addresses_keeps_the_first_seed_rule() {
        let seeds = [
            entry("10.0.0.1:7351", &["10.0.0.1:7351"]),
            entry("10.0.0.2:7351", &["10.0.0.2:7351"]),
        ];
        let first = assess(&seeds, at("10.0.0.1:7351"), 1);
        assert_eq!(first.role, SeedRole::FirstSeed);
        assert_eq!(first.labels(), ["10.0.0.2:7351"]);
        let second = assess(&seeds, at("10.0.0.2:7351"), 1);
        assert_eq!(second.role, SeedRole::Joiner);
        assert_eq!(assess(&[], at("10.0.0.1:7351"), 1).role, SeedRole::Alone);
    }

    #[test]
    fn of_a_name_for_several_nodes_the_lowest_address_forms_once_enough_resolve() {
        let pods = [entry(
            "warren:7351",
            &["10.0.0.3:7351", "10.0.0.1:7351", "10.0.0.2:7351"],
        )];
        let lowest = assess(&pods, at("10.0.0.1:7351"), 2);
        assert_eq!(lowest.role, SeedRole::FirstSeed);
        assert_eq!(
            lowest.labels(),
            ["warren:7351 (10.0.0.3:7351)", "warren:7351 (10.0.0.2:7351)"]
        );
        assert_eq!(assess(&pods, at("10.0.0.2:7351"), 2).role, SeedRole::Joiner);
        // Alone in DNS so far: not enough to form, whatever it is.
        let early = [entry("warren:7351", &["10.0.0.1:7351"])];
        assert_eq!(
            assess(&early, at("10.0.0.1:7351"), 2).role,
            SeedRole::Joiner
        );
        assert_eq!(
            assess(&early, at("10.0.0.1:7351"), 1).role,
            SeedRole::FirstSeed
        );
    }

    #[test]
    fn a_first_seed_that_does_not_resolve_makes_every_node_a_joiner_that_says_why() {
        let seeds = [
            (
                "warren:7351".to_owned(),
                Err("does not resolve: no such host".to_owned()),
            ),
            entry("10.0.0.2:7351", &["10.0.0.2:7351"]),
        ];
        let assessment = assess(&seeds, at("10.0.0.2:7351"), 1);
        assert_eq!(assessment.role, SeedRole::Joiner);
        assert_eq!(
            assessment.targets,
            [(
                "warren:7351".to_owned(),
                Err("does not resolve: no such host".to_owned())
            )]
        );
    }

    #[tokio::test]
    async fn a_name_is_looked_up_into_sorted_addresses() {
        let resolved = resolve(&["localhost:7351".to_owned(), "127.0.0.9:1".to_owned()]).await;
        let (_, localhost) = &resolved[0];
        let localhost = localhost.as_ref().unwrap();
        assert!(localhost.contains(&at("127.0.0.1:7351")), "{localhost:?}");
        assert!(localhost.windows(2).all(|pair| pair[0] < pair[1]));
        assert_eq!(resolved[1].1, Ok(vec![at("127.0.0.9:1")]));
    }
}
