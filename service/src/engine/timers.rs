//! A deadline queue: every timeout, back-off and lease expiry is one entry, and the timer task
//! sleeps until the earliest one. Nothing scans tables in a loop.

use std::collections::BTreeMap;

use tokio::time::Instant;

use super::model::{JobId, WorkerId};

/// What a timer does when it fires. Each handler re-checks that the job or worker is still in
/// the situation the timer was set for, so a stale timer is harmless.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Timer {
    /// A scheduled or backed-off job becomes ready to dispatch.
    Ready(JobId),
    /// A queued job's max wait for dispatch runs out.
    MaxWait(JobId),
    /// An assignment was not acknowledged in time.
    AckTimeout(JobId, u32),
    /// An attempt ran past its run timeout.
    RunTimeout(JobId, u32),
    /// The grace period after a cancel request is over.
    CancelGrace(JobId, u32),
    /// A worker's lease may have run out.
    WorkerLease(WorkerId),
    /// Prune expired idempotency keys and jobs past their retention; re-arms itself.
    Maintenance,
    /// The scheduler's next wake-up (an escalation, an expiry, a refill, a cooldown's end).
    Schedule,
}

/// Key of a scheduled timer, to cancel it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct TimerKey(Instant, u64);

impl TimerKey {
    /// When the timer fires.
    pub fn at(self) -> Instant {
        self.0
    }
}

/// The deadline queue.
#[derive(Default)]
pub(crate) struct Timers {
    entries: BTreeMap<TimerKey, Timer>,
    seq: u64,
}

impl Timers {
    /// Schedules a timer; returns its key and whether it is now the earliest (the timer task
    /// must then be woken to sleep less).
    pub fn insert(&mut self, at: Instant, timer: Timer) -> (TimerKey, bool) {
        self.seq += 1;
        let key = TimerKey(at, self.seq);
        let earliest = self.entries.keys().next().is_none_or(|first| key < *first);
        self.entries.insert(key, timer);
        (key, earliest)
    }

    /// Cancels a timer (no-op if it already fired).
    pub fn remove(&mut self, key: TimerKey) {
        self.entries.remove(&key);
    }

    /// Takes the next timer due at or before `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<Timer> {
        let (&key, _) = self.entries.iter().next()?;
        if key.0 > now {
            return None;
        }
        self.entries.remove(&key)
    }

    /// When the earliest timer fires.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.entries.keys().next().map(|k| k.0)
    }

    /// Number of scheduled timers.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn pops_in_deadline_order_and_removes() {
        let mut t = Timers::default();
        let now = Instant::now();
        let (_, first) = t.insert(now + Duration::from_secs(2), Timer::MaxWait(JobId::new()));
        assert!(first);
        let a = JobId::new();
        let (_, earlier) = t.insert(now + Duration::from_secs(1), Timer::Ready(a));
        assert!(earlier);
        let (k, later) = t.insert(now + Duration::from_secs(3), Timer::Ready(JobId::new()));
        assert!(!later);
        t.remove(k);
        assert_eq!(t.len(), 2);
        assert_eq!(t.pop_due(now), None);
        assert_eq!(
            t.pop_due(now + Duration::from_secs(1)),
            Some(Timer::Ready(a))
        );
        assert_eq!(t.next_deadline(), Some(now + Duration::from_secs(2)));
    }
}
