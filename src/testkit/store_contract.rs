//! What every [`EntityStore`] must do, as one check each store's tests run against it: appends
//! idempotent per key and numbered in order, paged reads, and snapshots kept newest-only and
//! fenced by claims, with recovery starting from the newest.

use crate::entity::EntityId;
use crate::entity::store::{Appended, Claim, EntityStore, Snapshot};

/// Panics, naming what broke, unless `store` keeps the contract. It claims entities named
/// `contract-*`, so a store shared with other checks keeps them apart.
pub async fn check(store: &dyn EntityStore) {
    let entity = EntityId::new("contract-a");
    let claim = store.claim(&entity).await.expect("claim");
    let mut seqs = Vec::new();
    for key in ["k1", "k2", "k3", "k4"] {
        match store.append(&claim, key, key.as_bytes()).await {
            Ok(Appended::New { seq }) => seqs.push(seq),
            other => panic!("append of {key}: {other:?}"),
        }
    }
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "numbered in order: {seqs:?}"
    );
    assert_eq!(
        store.append(&claim, "k2", b"again").await.expect("append"),
        Appended::Duplicate
    );
    let data = |records: &[crate::entity::store::Record]| {
        records.iter().map(|r| r.data.clone()).collect::<Vec<_>>()
    };
    let all = store
        .records(&entity, 0, usize::MAX)
        .await
        .expect("records");
    assert_eq!(data(&all), [b"k1", b"k2", b"k3", b"k4"].map(|k| k.to_vec()));
    let page = store.records(&entity, seqs[1], 2).await.expect("a page");
    assert_eq!(data(&page), [b"k2".to_vec(), b"k3".to_vec()], "paging");
    assert_eq!(page[0].seq, seqs[1]);
    let recovered = store.recover(&entity).await.expect("recover");
    assert_eq!((recovered.snapshot, recovered.records), (None, all));

    let snapshot = Snapshot {
        seq: seqs[1],
        data: b"state after k2".to_vec(),
    };
    store.save_snapshot(&claim, &snapshot).await.expect("save");
    let older = Snapshot {
        seq: seqs[0],
        data: b"state after k1".to_vec(),
    };
    store.save_snapshot(&claim, &older).await.expect("save");
    let recovered = store.recover(&entity).await.expect("recover");
    assert_eq!(recovered.snapshot.as_ref(), Some(&snapshot), "newest kept");
    assert_eq!(data(&recovered.records), [b"k3".to_vec(), b"k4".to_vec()]);

    let newer = store.claim(&entity).await.expect("claim");
    let stale = Snapshot {
        seq: seqs[3],
        data: b"stale".to_vec(),
    };
    let late = store.append(&claim, "k5", b"late").await;
    assert!(
        late.as_ref().is_err_and(|e| e.is_fenced()),
        "a stale claim appended: {late:?}"
    );
    let refused = store.save_snapshot(&claim, &stale).await;
    assert!(
        refused.as_ref().is_err_and(|e| e.is_fenced()),
        "a stale claim saved a snapshot: {refused:?}"
    );
    store.save_snapshot(&newer, &stale).await.expect("save");
    let recovered = store.recover(&entity).await.expect("recover");
    assert_eq!(recovered.snapshot, Some(stale));
    assert!(recovered.records.is_empty(), "{:?}", recovered.records);

    let unknown = store.recover(&EntityId::new("contract-none")).await;
    assert_eq!(unknown.expect("recover"), Default::default());
    // A claim no store handed out writes nothing either.
    let forged = Claim::new(EntityId::new("contract-unclaimed"), 1);
    let refused = store.save_snapshot(&forged, &snapshot).await;
    assert!(
        refused.is_err_and(|e| e.is_fenced()),
        "an unclaimed entity's snapshot"
    );
    let refused = store.append(&forged, "k1", b"forged").await;
    assert!(
        refused.is_err_and(|e| e.is_fenced()),
        "an unclaimed entity's append"
    );
}
