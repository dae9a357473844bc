//! A clock the test holds and moves by hand, for driving the sans-IO cores without a runtime.

use std::time::Duration;

use tokio::time::Instant;

/// A test's own time: it starts at the instant it is made and moves only when the test
/// advances it, so the cores see exactly the times the test chose, with no runtime and no
/// paused tokio clock.
#[derive(Debug)]
pub struct Clock {
    now: Instant,
}

impl Clock {
    /// A clock standing at the current instant.
    pub fn new() -> Self {
        Clock {
            now: Instant::now(),
        }
    }

    /// The time the clock stands at.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&mut self, by: Duration) {
        self.now += by;
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}
