//! Pauses between retries (reconnects, entity retries): exponential from a minimum, with
//! jitter, and never longer than the maximum. backon's jitter adds up to the whole current
//! delay on top of it, so a plain `with_max_delay(max).with_jitter()` pauses up to twice the
//! maximum (7.6–8.7 s gaps were seen with a 5 s `reconnect_max`): the exponential part is
//! capped at half the maximum here, and each pause clamped to the maximum.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// Endless pauses from about `min`, doubling, each within `[min, max]`; a `max` below `min` is
/// read as `min`.
pub fn jittered(min: Duration, max: Duration) -> impl Iterator<Item = Duration> + Send + use<> {
    let max = max.max(min);
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay((max / 2).max(min))
        .with_jitter()
        .without_max_times()
        .build()
        .map(move |pause| pause.min(max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_grow_from_the_minimum_and_never_pass_the_maximum() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        for _ in 0..20 {
            let pauses: Vec<Duration> = jittered(min, max).take(40).collect();
            assert_eq!(pauses.len(), 40, "never gives up");
            assert!(pauses.iter().all(|p| min <= *p && *p <= max), "{pauses:?}");
            assert!(pauses[0] < min * 2, "starts near the minimum: {pauses:?}");
            // Past the cap the pauses spread over the upper half, not all on the maximum.
            let late = &pauses[20..];
            assert!(late.iter().all(|p| *p >= max / 2), "{pauses:?}");
            assert!(
                late.iter().any(|p| *p < max),
                "jitter at the cap: {pauses:?}"
            );
        }
    }

    #[test]
    fn a_maximum_below_the_minimum_means_the_minimum() {
        let min = Duration::from_secs(1);
        let pauses: Vec<Duration> = jittered(min, Duration::from_millis(10)).take(5).collect();
        assert!(pauses.iter().all(|p| *p == min), "{pauses:?}");
    }
}
