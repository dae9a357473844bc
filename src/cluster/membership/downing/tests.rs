//! The downing rule over generated splits, and the resolver's timing on explicit time.

use std::collections::BTreeSet;
use std::time::Duration;

use proptest::prelude::{ProptestConfig, prop_assert, prop_assert_eq, proptest};
use tokio::time::Instant;

use super::*;
use crate::cluster::member::NodeId;

fn member(id: &str, started_at_ms: u64) -> Member {
    Member {
        addr: NodeAddr {
            id: NodeId::new(id),
            generation: started_at_ms,
        },
        rpc_addr: "127.0.0.1:1".parse().unwrap(),
        roles: BTreeSet::new(),
        status: MemberStatus::Up,
        started_at_ms,
    }
}

/// `n` members named m0…, started in a shuffled order given by `ages`.
fn members(ages: &[u64]) -> Vec<Member> {
    ages.iter()
        .enumerate()
        .map(|(i, age)| member(&format!("m{i}"), *age))
        .collect()
}

/// Every member's decision when the members are split into the sides `side_of` gives.
fn decisions(strategy: Strategy, all: &[Member], side_of: &[usize]) -> Vec<Decision> {
    let refs: Vec<&Member> = all.iter().collect();
    all.iter()
        .enumerate()
        .map(|(i, me)| {
            let unreachable = all
                .iter()
                .enumerate()
                .filter(|(j, _)| side_of[*j] != side_of[i])
                .map(|(_, m)| m.addr.clone())
                .collect();
            decide(strategy, &me.addr, &refs, &unreachable)
        })
        .collect()
}

/// Which sides stay, after checking that every member of a side decided alike.
fn staying_sides(strategy: Strategy, all: &[Member], side_of: &[usize]) -> BTreeSet<usize> {
    let decisions = decisions(strategy, all, side_of);
    let mut staying = BTreeSet::new();
    for side in side_of.iter().copied().collect::<BTreeSet<_>>() {
        let mut of_side = (0..all.len())
            .filter(|i| side_of[*i] == side)
            .map(|i| decisions[i]);
        let first = of_side.next();
        assert!(
            of_side.all(|d| Some(d) == first),
            "side {side} disagrees under {strategy:?}"
        );
        if first == Some(Decision::KeepMySide) {
            staying.insert(side);
        }
    }
    staying
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Whatever the split (two to four sides, any sizes, any ages), the members of one side
    /// agree, and at most one side stays: two live owners of a shard cannot arise from the
    /// rule. With two sides, keep-majority and keep-oldest always keep exactly one.
    #[test]
    fn at_most_one_side_stays_in_any_split(
        ages in proptest::collection::vec(0u64..1_000, 1..10),
        sides in proptest::collection::vec(0usize..4, 10),
        down_if_alone in proptest::bool::ANY,
    ) {
        let all = members(&ages);
        let side_of = &sides[..all.len()];
        let n = all.len();
        let two_sides = side_of.iter().collect::<BTreeSet<_>>().len() == 2;
        for strategy in [
            Strategy::KeepMajority,
            Strategy::KeepOldest { down_if_alone },
            Strategy::StaticQuorum { quorum_size: n / 2 + 1 },
        ] {
            let staying = staying_sides(strategy, &all, side_of);
            prop_assert!(staying.len() <= 1, "{strategy:?} keeps {staying:?} of {side_of:?}");
            if two_sides && strategy != (Strategy::StaticQuorum { quorum_size: n / 2 + 1 }) {
                prop_assert_eq!(staying.len(), 1, "{:?} keeps no side of {:?}", strategy, side_of);
            }
        }
    }

    /// Without a split everybody stays, whatever the rule.
    #[test]
    fn a_whole_cluster_stays(ages in proptest::collection::vec(0u64..1_000, 1..10)) {
        let all = members(&ages);
        let side_of = vec![0; all.len()];
        for strategy in [
            Strategy::KeepMajority,
            Strategy::KeepOldest { down_if_alone: true },
            Strategy::StaticQuorum { quorum_size: all.len() / 2 + 1 },
        ] {
            prop_assert_eq!(staying_sides(strategy, &all, &side_of), BTreeSet::from([0]));
        }
    }
}

#[test]
fn keep_majority_keeps_the_larger_side_and_on_a_tie_the_lowest_address() {
    let all = members(&[10, 20, 30]);
    assert_eq!(
        staying_sides(Strategy::KeepMajority, &all, &[0, 1, 1]),
        BTreeSet::from([1])
    );
    let all = members(&[40, 30, 20, 10]);
    // m0 is the lowest address (though the youngest): its side stays, on either side.
    assert_eq!(
        staying_sides(Strategy::KeepMajority, &all, &[0, 0, 1, 1]),
        BTreeSet::from([0])
    );
    assert_eq!(
        staying_sides(Strategy::KeepMajority, &all, &[1, 0, 0, 1]),
        BTreeSet::from([1])
    );
    // Two nodes: the one with the lower address stays.
    let all = members(&[2, 1]);
    assert_eq!(
        staying_sides(Strategy::KeepMajority, &all, &[0, 1]),
        BTreeSet::from([0])
    );
}

#[test]
fn keep_oldest_keeps_the_oldest_unless_it_is_alone_against_two_or_more() {
    let all = members(&[30, 10, 20]); // m1 is the oldest
    let keep_oldest = Strategy::KeepOldest {
        down_if_alone: false,
    };
    let down_if_alone = Strategy::KeepOldest {
        down_if_alone: true,
    };
    assert_eq!(
        staying_sides(keep_oldest, &all, &[0, 1, 0]),
        BTreeSet::from([1])
    );
    assert_eq!(
        staying_sides(down_if_alone, &all, &[0, 1, 0]),
        BTreeSet::from([0])
    );
    assert_eq!(
        staying_sides(down_if_alone, &all, &[0, 1, 1]),
        BTreeSet::from([1])
    );
    // Alone against one: the oldest stays.
    let two = members(&[1, 2]);
    assert_eq!(
        staying_sides(down_if_alone, &two, &[0, 1]),
        BTreeSet::from([0])
    );
}

#[test]
fn static_quorum_downs_every_side_below_the_quorum() {
    let all = members(&[1, 2, 3, 4, 5]);
    let quorum = Strategy::StaticQuorum { quorum_size: 3 };
    assert_eq!(
        staying_sides(quorum, &all, &[0, 0, 0, 1, 1]),
        BTreeSet::from([0])
    );
    assert_eq!(
        staying_sides(quorum, &all, &[0, 0, 1, 1, 2]),
        BTreeSet::new()
    );
}

const STABLE: Duration = Duration::from_secs(5);
const MARGIN: Duration = Duration::from_secs(3);

fn resolver(strategy: Strategy, now: Instant) -> Resolver {
    Resolver::new(
        DowningSettings {
            strategy,
            stable_after: STABLE,
            down_removal_margin: MARGIN,
        },
        now,
    )
}

fn runs(members: &[&Member]) -> BTreeSet<NodeAddr> {
    members.iter().map(|m| m.addr.clone()).collect()
}

#[test]
fn a_minority_downs_itself_at_stable_after_and_the_majority_downs_it_only_a_margin_later() {
    let t0 = Instant::now();
    let (a, b, c) = (member("a", 1), member("b", 2), member("c", 3));
    let all = [&a, &b, &c];
    let mut alone = resolver(Strategy::KeepMajority, t0);
    let mut majority = resolver(Strategy::KeepMajority, t0);
    alone.handle_view(t0, &a.addr, &all, &BTreeSet::new());
    majority.handle_view(t0, &b.addr, &all, &BTreeSet::new());

    let cut = t0 + Duration::from_secs(1);
    let mut now = cut;
    while now < cut + STABLE + MARGIN + Duration::from_secs(1) {
        alone.handle_view(now, &a.addr, &all, &runs(&[&b, &c]));
        majority.handle_view(now, &b.addr, &all, &runs(&[&a]));
        let settled = now >= cut + STABLE;
        assert_eq!(alone.downed_self().is_some(), settled, "at {:?}", now - cut);
        assert!(majority.downed_self().is_none());
        let removed = now >= cut + STABLE + MARGIN;
        assert_eq!(
            majority.downed().contains(&a.addr),
            removed,
            "at {:?}",
            now - cut
        );
        now += Duration::from_millis(200);
    }
    assert_eq!(
        alone.downed_self(),
        Some(&DownReason::LosingSide {
            strategy: "keep-majority",
            reachable: 1,
            unreachable: 2
        })
    );
    assert!(alone.downed().is_empty(), "a loser downs nobody else");
}

#[test]
fn a_change_during_stable_after_restarts_the_wait() {
    let t0 = Instant::now();
    let members: Vec<Member> = (0..5).map(|i| member(&format!("m{i}"), i)).collect();
    let all: Vec<&Member> = members.iter().collect();
    let me = &members[0].addr;
    let mut resolver = resolver(Strategy::KeepMajority, t0);
    resolver.handle_view(t0, me, &all, &runs(&[&members[4]]));
    // Four seconds later a second member becomes unreachable: the wait starts again.
    let changed = t0 + Duration::from_secs(4);
    resolver.handle_view(changed, me, &all, &runs(&[&members[3], &members[4]]));
    resolver.handle_view(
        t0 + STABLE + Duration::from_secs(1),
        me,
        &all,
        &runs(&[&members[3], &members[4]]),
    );
    assert!(resolver.pending().is_none(), "decided on an unstable view");
    resolver.handle_view(
        changed + STABLE,
        me,
        &all,
        &runs(&[&members[3], &members[4]]),
    );
    let (pending, due) = resolver.pending().expect("decided once stable");
    assert_eq!(pending, &runs(&[&members[3], &members[4]]));
    assert_eq!(due, changed + STABLE + MARGIN);
}

#[test]
fn a_partition_healed_before_stable_after_decides_nothing() {
    let t0 = Instant::now();
    let (a, b, c) = (member("a", 1), member("b", 2), member("c", 3));
    let all = [&a, &b, &c];
    let mut resolver = resolver(Strategy::KeepMajority, t0);
    resolver.handle_view(t0, &a.addr, &all, &runs(&[&b, &c]));
    resolver.handle_view(t0 + STABLE / 2, &a.addr, &all, &BTreeSet::new());
    resolver.handle_view(t0 + STABLE * 4, &a.addr, &all, &BTreeSet::new());
    assert!(resolver.downed_self().is_none());
    assert!(resolver.pending().is_none());
}

#[test]
fn a_run_reachable_again_when_the_margin_ends_keeps_its_work_unless_it_went_down() {
    let t0 = Instant::now();
    let (a, b, c) = (member("a", 1), member("b", 2), member("c", 3));
    let all = [&a, &b, &c];
    let mut resolver = resolver(Strategy::KeepMajority, t0);
    resolver.handle_view(t0, &b.addr, &all, &runs(&[&a]));
    resolver.handle_view(t0 + STABLE, &b.addr, &all, &runs(&[&a]));
    assert!(resolver.pending().is_some());
    // a is reachable again and still Up when the margin ends: it saw the heal in time.
    resolver.handle_view(t0 + STABLE + MARGIN, &b.addr, &all, &BTreeSet::new());
    assert!(resolver.downed().is_empty());
    assert!(resolver.pending().is_none());

    // Another split; this time a downed itself (it announces Down) before the margin ended.
    let t1 = t0 + STABLE * 4;
    resolver.handle_view(t1, &b.addr, &all, &runs(&[&a]));
    resolver.handle_view(t1 + STABLE, &b.addr, &all, &runs(&[&a]));
    let mut a_down = a.clone();
    a_down.status = MemberStatus::Down;
    resolver.handle_view(
        t1 + STABLE + MARGIN,
        &b.addr,
        &[&a_down, &b, &c],
        &BTreeSet::new(),
    );
    assert_eq!(resolver.downed(), &runs(&[&a]));
    // And a downed run no longer counts: b and c alone are the whole cluster now.
    resolver.handle_view(t1 + STABLE * 3, &b.addr, &all, &runs(&[&a]));
    assert!(resolver.downed_self().is_none());
    assert!(resolver.pending().is_none());
}

#[test]
fn a_view_that_never_settles_downs_the_node_before_a_settled_side_could_take_over() {
    let t0 = Instant::now();
    let members: Vec<Member> = (0..5).map(|i| member(&format!("m{i}"), i)).collect();
    let all: Vec<&Member> = members.iter().collect();
    let me = &members[0].addr;
    let mut resolver = resolver(Strategy::KeepMajority, t0);
    // m4 stays unreachable; m3 flaps every second.
    let mut now = t0;
    let mut flap = false;
    while resolver.downed_self().is_none() {
        let unreachable = if flap {
            runs(&[&members[3], &members[4]])
        } else {
            runs(&[&members[4]])
        };
        resolver.handle_view(now, me, &all, &unreachable);
        assert!(resolver.pending().is_none(), "decided on an unstable view");
        flap = !flap;
        now += Duration::from_secs(1);
        assert!(now < t0 + STABLE * 3, "never downed itself");
    }
    let went_at = now - Duration::from_secs(1);
    assert!(matches!(
        resolver.downed_self(),
        Some(DownReason::Unstable { .. })
    ));
    assert!(went_at >= t0 + STABLE + MARGIN / 2);
    // The earliest another side settles on seeing this one go is t0 + STABLE; it takes over
    // a margin after that.
    assert!(went_at < t0 + STABLE + MARGIN);
}

#[test]
fn joining_and_down_members_do_not_count_and_a_joining_node_decides_nothing() {
    let t0 = Instant::now();
    let a = member("a", 1);
    let mut b = member("b", 2);
    let mut c = member("c", 3);
    let mut d = member("d", 4);
    c.status = MemberStatus::Joining;
    d.status = MemberStatus::Down;
    // a and b split; c and d, on b's side, do not make it a majority: a has the lower address.
    let mut resolver_b = resolver(Strategy::KeepMajority, t0);
    for now in [t0, t0 + STABLE] {
        resolver_b.handle_view(now, &b.addr, &[&a, &b, &c, &d], &runs(&[&a]));
    }
    assert!(resolver_b.downed_self().is_some());
    // A joining node takes no decision at all.
    b.status = MemberStatus::Joining;
    let mut joining = resolver(Strategy::KeepMajority, t0);
    for now in [t0, t0 + STABLE * 2] {
        joining.handle_view(now, &b.addr, &[&a, &b], &runs(&[&a]));
    }
    assert!(joining.downed_self().is_none() && joining.pending().is_none());
}

#[test]
fn off_decides_nothing() {
    let t0 = Instant::now();
    let (a, b, c) = (member("a", 1), member("b", 2), member("c", 3));
    let mut resolver = resolver(Strategy::Off, t0);
    for now in [t0, t0 + STABLE * 3] {
        resolver.handle_view(now, &a.addr, &[&a, &b, &c], &runs(&[&b, &c]));
    }
    assert!(resolver.downed_self().is_none() && resolver.pending().is_none());
}

#[test]
fn being_declared_down_by_others_is_final() {
    let mut resolver = resolver(Strategy::KeepMajority, Instant::now());
    resolver.handle_downed_by_others();
    assert_eq!(resolver.downed_self(), Some(&DownReason::DownedByOthers));
}

const DELAY: Duration = Duration::from_secs(2);

#[test]
fn with_a_lease_the_majority_asks_at_once_the_minority_later_and_the_answer_decides() {
    let t0 = Instant::now();
    let (a, b, c) = (member("a", 1), member("b", 2), member("c", 3));
    let all = [&a, &b, &c];
    let lease = Strategy::LeaseMajority {
        delay_for_minority: DELAY,
    };
    let mut alone = resolver(lease, t0);
    let mut majority = resolver(lease, t0);
    for now in [t0, t0 + STABLE] {
        alone.handle_view(now, &a.addr, &all, &runs(&[&b, &c]));
        majority.handle_view(now, &b.addr, &all, &runs(&[&a]));
    }
    let settled = t0 + STABLE;
    // The majority asks at once, as its lowest member (so b and c ask as one holder).
    let request = majority
        .lease_request(settled)
        .expect("asks at once")
        .clone();
    assert_eq!(request.holder, b.addr.to_string());
    assert_eq!(request.at, settled);
    // The minority waits before it asks.
    assert!(alone.lease_request(settled).is_none());
    let asks_at = alone.lease_request(settled + DELAY).expect("asks later").at;
    assert_eq!(asks_at, settled + DELAY);
    assert!(
        alone.downed_self().is_none(),
        "nothing decided before the answer"
    );

    majority.handle_lease(settled, Ok(()));
    let (downing, due) = majority.pending().expect("the others are downed later");
    assert_eq!(downing, &runs(&[&a]));
    // After the minority has asked and gone, and the margin.
    assert_eq!(due, settled + DELAY + MARGIN);
    // A late answer still leaves the margin after it.
    let mut slow = resolver(lease, t0);
    for now in [t0, settled] {
        slow.handle_view(now, &b.addr, &all, &runs(&[&a]));
    }
    let answered = settled + DELAY * 5;
    slow.handle_lease(answered, Ok(()));
    assert_eq!(slow.pending().map(|(_, due)| due), Some(answered + MARGIN));
    alone.handle_lease(settled + DELAY, Err("held by b#2".to_owned()));
    assert!(matches!(
        alone.downed_self(),
        Some(DownReason::LeaseNotAcquired { .. })
    ));
    assert!(alone.lease_request(settled + DELAY * 2).is_none());
}

#[test]
fn a_lease_asked_for_one_split_is_forgotten_when_the_split_changes() {
    let t0 = Instant::now();
    let (a, b, c) = (member("a", 1), member("b", 2), member("c", 3));
    let all = [&a, &b, &c];
    let mut resolver = resolver(
        Strategy::LeaseMajority {
            delay_for_minority: DELAY,
        },
        t0,
    );
    resolver.handle_view(t0, &b.addr, &all, &runs(&[&a]));
    resolver.handle_view(t0 + STABLE, &b.addr, &all, &runs(&[&a]));
    assert!(resolver.lease_request(t0 + STABLE).is_some());
    // c goes too before the answer: the question no longer stands.
    resolver.handle_view(t0 + STABLE, &b.addr, &all, &runs(&[&a, &c]));
    assert!(resolver.lease_request(t0 + STABLE).is_none());
    resolver.handle_lease(t0 + STABLE, Ok(()));
    assert!(resolver.pending().is_none(), "an answer nobody waits for");
}
