//! Turns what gossip knows (nodes, whether the failure detector thinks they live, and the keys
//! each published) into a [`ClusterView`]. Pure, so the rules are tested without sockets.
//!
//! Rules: the newest run of a name wins; a run the failure detector considers dead is `Down`
//! whatever it last said; a record whose keys are missing, malformed or not signed with the
//! cluster secret is not trusted. An untrusted update of a member already known keeps the
//! member as last known (gossip may carry a new status a moment before its signature), so a
//! member never vanishes from the view for that alone. Each node also publishes the runs its
//! downing strategy declared down (read back from trusted records into
//! [`GossipRead::downed_by_others`]), so a decision reaches the runs that could not hear it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use crate::cluster::auth::Security;
use crate::cluster::member::{ClusterView, Member, MemberStatus, NodeAddr, NodeId};

/// Key: where the node's transport listens.
pub const KEY_RPC_ADDR: &str = "rpc_addr";
/// Key: comma-separated roles.
pub const KEY_ROLES: &str = "roles";
/// Key: the node's own status.
pub const KEY_STATUS: &str = "status";
/// Key: start time in milliseconds since the epoch.
pub const KEY_STARTED_AT: &str = "started_at";
/// Key: the runs this node declared down, space-separated `name#generation`.
pub const KEY_DOWNED: &str = "downed";
/// Key: the record's signature with the cluster secret (hex).
pub const KEY_SIGNATURE: &str = "sig";

/// One node as gossip knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GossipNode {
    /// Its name and run.
    pub addr: NodeAddr,
    /// The failure detector considers it alive.
    pub alive: bool,
    /// The keys it published.
    pub keys: BTreeMap<String, String>,
}

/// The keys a node publishes about itself and the runs it declared `downed`, signed when the
/// cluster has a secret.
pub fn own_keys(
    member: &Member,
    downed: &BTreeSet<NodeAddr>,
    security: &Security,
) -> Vec<(String, String)> {
    let downed: Vec<String> = downed.iter().map(ToString::to_string).collect();
    let mut keys = vec![
        (KEY_RPC_ADDR.to_owned(), member.rpc_addr.to_string()),
        (
            KEY_ROLES.to_owned(),
            member.roles.iter().cloned().collect::<Vec<_>>().join(","),
        ),
        (KEY_STATUS.to_owned(), member.status.as_str().to_owned()),
        (KEY_STARTED_AT.to_owned(), member.started_at_ms.to_string()),
        // Always set (an empty list replaces an old one in gossip), signed only when not
        // empty: so a record without one is signed as before, and older nodes trust it.
        (KEY_DOWNED.to_owned(), downed.join(" ")),
    ];
    if let Some(secret) = security.secret() {
        let signed = signed_text(&member.addr, |key| {
            keys.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
        });
        let signature = secret.gossip_tag(signed.as_bytes());
        keys.push((KEY_SIGNATURE.to_owned(), hex(&signature)));
    }
    keys
}

/// What a signature covers: the node's name and run, and every key it publishes.
fn signed_text<'a>(addr: &NodeAddr, value: impl Fn(&str) -> Option<&'a str>) -> String {
    let mut text = format!("{}\n{}", addr.id, addr.generation);
    for key in [KEY_RPC_ADDR, KEY_ROLES, KEY_STATUS, KEY_STARTED_AT] {
        text.push('\n');
        text.push_str(value(key).unwrap_or(""));
    }
    if let Some(downed) = value(KEY_DOWNED).filter(|d| !d.is_empty()) {
        text.push_str("\ndowned:");
        text.push_str(downed);
    }
    text
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Reads a member from its keys; `None` when they are incomplete, malformed, or (with a
/// secret) not signed with it.
pub fn member_from_keys(node: &GossipNode, security: &Security) -> Option<Member> {
    if let Some(secret) = security.secret() {
        let signature = unhex(node.keys.get(KEY_SIGNATURE)?)?;
        let signed = signed_text(&node.addr, |key| node.keys.get(key).map(String::as_str));
        if !secret.verify_gossip_tag(signed.as_bytes(), &signature) {
            return None;
        }
    }
    let rpc_addr: SocketAddr = node.keys.get(KEY_RPC_ADDR)?.parse().ok()?;
    let roles: BTreeSet<String> = node
        .keys
        .get(KEY_ROLES)?
        .split(',')
        .filter(|r| !r.is_empty())
        .map(str::to_owned)
        .collect();
    let status = MemberStatus::parse(node.keys.get(KEY_STATUS)?)?;
    let started_at_ms = node.keys.get(KEY_STARTED_AT)?.parse().ok()?;
    Some(Member {
        addr: node.addr.clone(),
        rpc_addr,
        roles,
        status,
        started_at_ms,
    })
}

/// Reads a run as [`NodeAddr`]'s `Display` writes it.
fn parse_run(text: &str) -> Option<NodeAddr> {
    let (id, generation) = text.rsplit_once('#')?;
    Some(NodeAddr {
        id: NodeId::new(id),
        generation: generation.parse().ok()?,
    })
}

/// Trusted member records by run, carried from one view to the next.
pub type KnownMembers = BTreeMap<NodeAddr, Member>;

/// What one reading of gossip gives.
#[derive(Clone, Debug, PartialEq)]
pub struct GossipRead {
    /// The view of this node.
    pub view: ClusterView,
    /// Records that were not trusted.
    pub untrusted: usize,
    /// The runs other nodes declared down, from their trusted records.
    pub downed_by_others: BTreeSet<NodeAddr>,
}

/// The view of `me` (always present, as it says about itself) given what gossip knows.
/// `known` remembers the last trusted record of every run; runs gossip forgot are dropped
/// from it.
pub fn view_from_gossip(
    me: &Member,
    nodes: &[GossipNode],
    security: &Security,
    known: &mut KnownMembers,
) -> GossipRead {
    let mut untrusted = 0;
    let mut downed_by_others = BTreeSet::new();
    let mut view = ClusterView::alone(me.clone());
    let mut newest: BTreeMap<NodeId, Member> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for node in nodes {
        if node.addr.id == me.addr.id {
            continue;
        }
        seen.insert(node.addr.clone());
        match member_from_keys(node, security) {
            Some(member) => {
                known.insert(node.addr.clone(), member);
                let listed = node.keys.get(KEY_DOWNED).map_or("", String::as_str);
                downed_by_others.extend(listed.split_whitespace().filter_map(parse_run));
            }
            None => untrusted += 1,
        }
        let Some(mut member) = known.get(&node.addr).cloned() else {
            continue;
        };
        if !node.alive {
            member.status = MemberStatus::Down;
        }
        match newest.get(&node.addr.id) {
            Some(other) if other.addr.generation > node.addr.generation => {}
            _ => {
                newest.insert(node.addr.id.clone(), member);
            }
        }
    }
    known.retain(|addr, _| seen.contains(addr));
    view.members.extend(newest);
    GossipRead {
        view,
        untrusted,
        downed_by_others,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> Member {
        Member {
            addr: NodeAddr {
                id: NodeId::new("a"),
                generation: 5,
            },
            rpc_addr: "127.0.0.1:7001".parse().unwrap(),
            roles: BTreeSet::from(["shard-host".to_owned()]),
            status: MemberStatus::Up,
            started_at_ms: 5,
        }
    }

    fn secured() -> Security {
        Security::Secret(crate::cluster::auth::ClusterSecret::new("a secret of sixteen+").unwrap())
    }

    fn gossip(id: &str, generation: u64, alive: bool, status: &str) -> GossipNode {
        let mut member = me();
        member.addr = NodeAddr {
            id: NodeId::new(id),
            generation,
        };
        member.started_at_ms = generation;
        member.status = MemberStatus::parse(status).unwrap_or(MemberStatus::Up);
        let mut keys: BTreeMap<String, String> = own_keys(&member, &BTreeSet::new(), &secured())
            .into_iter()
            .collect();
        keys.insert(KEY_STATUS.to_owned(), status.to_owned());
        GossipNode {
            addr: member.addr,
            alive,
            keys,
        }
    }

    fn view(nodes: &[GossipNode]) -> ClusterView {
        view_from_gossip(&me(), nodes, &secured(), &mut KnownMembers::new()).view
    }

    #[test]
    fn a_node_reads_back_exactly_what_it_published() {
        for security in [secured(), Security::Insecure] {
            let node = GossipNode {
                addr: me().addr,
                alive: true,
                keys: own_keys(&me(), &BTreeSet::new(), &security)
                    .into_iter()
                    .collect(),
            };
            assert_eq!(member_from_keys(&node, &security), Some(me()));
        }
    }

    #[test]
    fn the_newest_run_of_a_name_wins_and_a_dead_one_is_down() {
        let view = view(&[
            gossip("b", 10, false, "up"),
            gossip("b", 20, true, "joining"),
            gossip("c", 30, false, "up"),
        ]);
        let status = |id: &str| view.members.get(&NodeId::new(id)).map(|m| m.status);
        assert_eq!(status("b"), Some(MemberStatus::Joining));
        assert_eq!(view.members[&NodeId::new("b")].addr.generation, 20);
        assert_eq!(status("c"), Some(MemberStatus::Down));
        assert_eq!(status("a"), Some(MemberStatus::Up), "self as it says");
    }

    #[test]
    fn a_node_with_missing_or_garbled_keys_is_left_out() {
        let mut garbled = gossip("b", 10, true, "up");
        garbled
            .keys
            .insert(KEY_RPC_ADDR.to_owned(), "not an address".to_owned());
        let mut missing = gossip("c", 10, true, "up");
        missing.keys.remove(KEY_STARTED_AT);
        let unknown_status = gossip("d", 10, true, "sleeping");
        let view = view(&[garbled, missing, unknown_status]);
        assert_eq!(view.members.len(), 1);
    }

    #[test]
    fn gossip_about_this_node_never_overrides_what_it_knows_of_itself() {
        let stale_self = gossip("a", 1, false, "down");
        let view = view(&[stale_self]);
        assert_eq!(view.me(), Some(&me()));
    }

    #[test]
    fn a_record_forged_without_the_secret_is_ignored() {
        let mut forged = gossip("b", 10, true, "up");
        let insecure: BTreeMap<String, String> = own_keys(
            &member_from_keys(&forged, &secured()).unwrap(),
            &BTreeSet::new(),
            &Security::Insecure,
        )
        .into_iter()
        .collect();
        forged.keys = insecure;
        let read = view_from_gossip(&me(), &[forged], &secured(), &mut KnownMembers::new());
        assert_eq!(read.view.members.len(), 1);
        assert_eq!(read.untrusted, 1);

        let mut tampered = gossip("c", 10, true, "up");
        tampered
            .keys
            .insert(KEY_ROLES.to_owned(), "admin".to_owned());
        assert_eq!(
            view_from_gossip(&me(), &[tampered], &secured(), &mut KnownMembers::new())
                .view
                .members
                .len(),
            1
        );
    }

    #[test]
    fn downed_runs_are_read_back_from_trusted_records_only() {
        let b = gossip("b", 10, true, "up");
        let c = gossip("c", 20, true, "up");
        let b_member = member_from_keys(&b, &secured()).unwrap();
        let declared = BTreeSet::from([c.addr.clone(), me().addr]);
        let mut b_says = b.clone();
        b_says.keys = own_keys(&b_member, &declared, &secured())
            .into_iter()
            .collect();
        let downed_by = |nodes: &[GossipNode]| {
            view_from_gossip(&me(), nodes, &secured(), &mut KnownMembers::new()).downed_by_others
        };
        assert_eq!(downed_by(&[b_says.clone()]), declared);
        // Unsigned, or signed over another list: ignored.
        let mut forged = b_says.clone();
        forged
            .keys
            .insert(KEY_DOWNED.to_owned(), "c#20 d#1".to_owned());
        assert!(downed_by(&[forged]).is_empty());
        // What this node says about others is not news to it.
        let mut mine = b_says;
        mine.addr = me().addr;
        assert!(downed_by(&[mine]).is_empty());
    }

    #[test]
    fn a_known_member_stays_as_last_trusted_while_an_update_is_unsigned() {
        let mut known = KnownMembers::new();
        let up = gossip("b", 10, true, "up");
        view_from_gossip(&me(), std::slice::from_ref(&up), &secured(), &mut known);
        let mut half_updated = up.clone();
        half_updated
            .keys
            .insert(KEY_STATUS.to_owned(), "leaving".to_owned());
        let read = view_from_gossip(&me(), &[half_updated], &secured(), &mut known);
        assert_eq!(read.untrusted, 1);
        assert_eq!(
            read.view.members[&NodeId::new("b")].status,
            MemberStatus::Up
        );
        view_from_gossip(&me(), &[], &secured(), &mut known);
        assert!(known.is_empty(), "forgotten runs leave the cache");
    }
}
