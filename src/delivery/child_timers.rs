//! The deadlines of many child controllers in one heap. Each child remembers the deadline it
//! armed; an entry popped that no longer matches it is stale and skipped, so re-arming a child
//! never searches the heap.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use tokio::time::Instant;

/// Deadlines keyed by child.
pub(crate) struct ChildTimers<K> {
    heap: BinaryHeap<Reverse<(Instant, K)>>,
}

impl<K: Ord + Clone> ChildTimers<K> {
    pub(crate) fn new() -> Self {
        ChildTimers {
            heap: BinaryHeap::new(),
        }
    }

    /// Records `deadline` as the child's (`armed` is the child's own record of it).
    pub(crate) fn arm(&mut self, key: &K, armed: &mut Option<Instant>, deadline: Option<Instant>) {
        if deadline != *armed {
            *armed = deadline;
            if let Some(at) = deadline {
                self.heap.push(Reverse((at, key.clone())));
            }
        }
    }

    /// The next entry due by `now`; it fires only if it still equals the child's `armed`.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<(Instant, K)> {
        match self.heap.peek() {
            Some(Reverse((at, _))) if *at <= now => self.heap.pop().map(|Reverse(entry)| entry),
            _ => None,
        }
    }

    /// The earliest deadline (possibly stale: early, never late).
    pub(crate) fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, _))| *at)
    }
}
