//! Jittered exponential back-off shared by the watch resumption and the worker's reconnects.

use std::time::Duration;

/// `base * 2^exponent`, capped at `max`, then jittered uniformly into `[d/2, d]` so that many
/// clients disconnected at once do not reconnect in lockstep.
pub(crate) fn jittered(base: Duration, max: Duration, exponent: u32) -> Duration {
    let factor = 1u32.checked_shl(exponent.min(31)).unwrap_or(u32::MAX);
    let d = base.saturating_mul(factor).min(max);
    let half = d / 2;
    let spread = u64::try_from((d - half).as_nanos()).unwrap_or(u64::MAX);
    half + Duration::from_nanos(rand::random_range(0..=spread))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_caps() {
        let base = Duration::from_millis(50);
        let max = Duration::from_secs(5);
        for exp in 0..40 {
            let d = jittered(base, max, exp);
            let nominal = base.saturating_mul(1u32 << exp.min(31)).min(max);
            assert!(d >= nominal / 2 && d <= nominal, "{exp}: {d:?}");
        }
        assert!(jittered(base, max, 100) >= Duration::from_millis(2500));
    }
}
