//! In-memory fan-out of committed changes to waiters and watchers.
//!
//! Only committed data goes through the hub: the committer publishes after each transaction.
//! A topic exists only while someone subscribes to the job, so the hub costs nothing for jobs
//! nobody watches, and thousands of waiters cost no database query while nothing changes.
//! Waiters only need snapshots; a topic gets an event channel only once a watcher asks for one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, watch};

use super::model::{Event, Job, JobId};

/// Capacity of a job's live event channel; a watcher that falls further behind re-reads from
/// the database.
const EVENT_CHANNEL_CAPACITY: usize = 256;

struct Topic {
    snapshot: watch::Sender<Option<Arc<Job>>>,
    events: Option<broadcast::Sender<Arc<Event>>>,
    subscribers: usize,
}

/// Per-job topics of committed snapshots and events.
#[derive(Default)]
pub struct Hub {
    topics: Mutex<HashMap<JobId, Topic>>,
    /// Number of topics, read without the lock so publishing costs nothing when nobody
    /// subscribes. A subscriber registers before it reads the store, and a publication follows
    /// its commit, so a publication skipped for want of topics is in the subscriber's read.
    live: AtomicUsize,
}

/// Keeps a topic alive; dropping it unsubscribes.
pub struct SubscriptionGuard {
    hub: Arc<Hub>,
    id: JobId,
}

/// A subscription to one job.
pub struct Subscription {
    /// Unsubscribes when dropped.
    pub guard: SubscriptionGuard,
    /// The newest committed snapshot published since subscribing (None until one is).
    pub snapshot: watch::Receiver<Option<Arc<Job>>>,
    /// Committed events published since subscribing (only if asked for).
    pub events: Option<broadcast::Receiver<Arc<Event>>>,
}

impl Hub {
    /// Subscribes to a job's changes, with its events if `events`. Subscribe *before* reading
    /// the store, so that nothing committed in between is missed.
    pub fn subscribe(self: &Arc<Self>, id: JobId, events: bool) -> Subscription {
        let mut topics = self.topics.lock().expect("hub lock");
        let topic = topics.entry(id).or_insert_with(|| {
            self.live.fetch_add(1, Ordering::SeqCst);
            Topic {
                snapshot: watch::channel(None).0,
                events: None,
                subscribers: 0,
            }
        });
        topic.subscribers += 1;
        let events = events.then(|| {
            topic
                .events
                .get_or_insert_with(|| broadcast::channel(EVENT_CHANNEL_CAPACITY).0)
                .subscribe()
        });
        Subscription {
            guard: SubscriptionGuard {
                hub: self.clone(),
                id,
            },
            snapshot: topic.snapshot.subscribe(),
            events,
        }
    }

    /// Publishes a committed snapshot and events of one job.
    pub fn publish(&self, job: Option<&Arc<Job>>, events: &[Arc<Event>]) {
        let id = match (job, events.first()) {
            (Some(j), _) => j.id,
            (None, Some(e)) => e.job_id,
            (None, None) => return,
        };
        if self.live.load(Ordering::SeqCst) == 0 {
            return;
        }
        let topics = self.topics.lock().expect("hub lock");
        let Some(topic) = topics.get(&id) else {
            return;
        };
        if let Some(tx) = &topic.events {
            for e in events {
                // No receiver means every watcher is gone; nothing to do.
                let _ = tx.send(e.clone());
            }
        }
        if let Some(job) = job {
            topic.snapshot.send_if_modified(|cur| {
                if cur.as_ref().is_none_or(|c| c.version < job.version) {
                    *cur = Some(job.clone());
                    true
                } else {
                    false
                }
            });
        }
    }

    /// Number of jobs with subscribers (for tests and metrics).
    pub fn topics(&self) -> usize {
        self.topics.lock().expect("hub lock").len()
    }
}

impl Drop for SubscriptionGuard {
    fn drop(&mut self) {
        let mut topics = self.hub.topics.lock().expect("hub lock");
        if let Some(t) = topics.get_mut(&self.id) {
            t.subscribers -= 1;
            if t.subscribers == 0 {
                topics.remove(&self.id);
                self.hub.live.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}
