//! Random orders like the original sample's, and the pacing that spreads them evenly over time.

use std::time::Duration;

use rand::Rng;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use tokio::time::Instant;
use uuid::Uuid;
use warren::order::CreateOrder;

/// Makes orders for randomly chosen products.
pub struct OrderGenerator {
    products: Vec<String>,
    rng: SmallRng,
}

impl OrderGenerator {
    /// Orders spread over `products` (must not be empty).
    pub fn new(products: Vec<String>) -> Self {
        OrderGenerator {
            products,
            rng: SmallRng::from_rng(&mut rand::rng()),
        }
    }

    /// A fresh order: new UUIDv4, customer 0–9999, one of the products, quantity 1–9.
    pub fn next_order(&mut self) -> CreateOrder {
        let product = self.rng.random_range(0..self.products.len());
        CreateOrder {
            order_id: Uuid::new_v4().into(),
            customer_id: self.rng.random_range(0..10_000u32).to_string(),
            product_id: self.products[product].clone(),
            quantity: self.rng.random_range(1..=9),
            trace_context: None,
        }
    }
}

/// When the n-th message is due at a steady rate; catches up after a stall instead of
/// bursting forever.
pub struct Pacer {
    start: Instant,
    interval: Option<Duration>,
}

impl Pacer {
    /// `per_second` 0 means no pacing.
    pub fn new(per_second: u64) -> Self {
        Pacer {
            start: Instant::now(),
            interval: (per_second > 0).then(|| Duration::from_secs(1) / per_second as u32),
        }
    }

    /// When message number `n` (from 0) may go; `None` means now.
    pub fn due(&self, n: u64) -> Option<Instant> {
        let interval = self.interval?;
        let offset = interval.checked_mul(u32::try_from(n).unwrap_or(u32::MAX))?;
        Some(self.start + offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_stay_within_the_sample_ranges() {
        let mut generator = OrderGenerator::new(vec!["a".into(), "b".into()]);
        for _ in 0..1000 {
            let order = generator.next_order();
            assert!((1..=9).contains(&order.quantity));
            assert!(["a", "b"].contains(&order.product_id.as_str()));
            assert!(order.customer_id.parse::<u32>().unwrap() < 10_000);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn messages_are_due_at_an_even_pace() {
        let pacer = Pacer::new(4);
        let start = Instant::now();
        assert_eq!(pacer.due(0), Some(start));
        assert_eq!(pacer.due(6), Some(start + Duration::from_millis(1500)));
        assert_eq!(Pacer::new(0).due(6), None);
    }
}
