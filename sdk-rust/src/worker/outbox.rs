//! The worker's ordered queue of reports (acks, progress, output, outcomes) waiting to be sent.
//!
//! It outlives sessions: reports queued while the worker is disconnected are sent after it
//! reconnects. Progress and output take permits from a byte budget until they have been handed
//! to the transport, so a chatty handler is slowed down instead of buffering without bound. Acks
//! and outcomes take no permits: the run loop queues them and must never wait.
//!
//! One FIFO for every report keeps each attempt's reports in order (ack, then output, then the
//! outcome), which the service relies on: "output sent before an outcome is committed before
//! it". Heartbeats do not go through here; they have their own lane (see `runtime.rs`).
//!
//! A batch taken by a session's stream stays *in flight* until the transport has taken it (see
//! [`Outbox::handed_over`]). If the session ends first, the batch goes back to the front of the
//! queue, so reports taken by a stream that was already dead, or stuck behind HTTP/2 flow
//! control, are sent again by the next session instead of being lost.
//!
//! Reports of an attempt the service no longer considers the worker's are pointless (they would
//! only be rejected): once the attempt is [muted](Outbox::mute), its queued progress, output and
//! ack are dropped and new ones are refused; only its outcome still goes out.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use jobplane_proto::pb;
use prost::Message;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::AttemptKey;

/// Reports per `WorkerReports` message, at most.
const MAX_BATCH_REPORTS: usize = 4096;
/// Encoded bytes per `WorkerReports` message, at most (unless one report alone is bigger): well
/// under the service's 4 MiB default message limit.
const MAX_BATCH_BYTES: usize = 1 << 20;

/// A report waiting to be sent.
pub(crate) struct Queued {
    pub(crate) key: AttemptKey,
    pub(crate) report: pb::WorkerReport,
    pub(crate) is_outcome: bool,
    /// Budget held until the report has been handed to the transport.
    _permit: Option<OwnedSemaphorePermit>,
}

impl Queued {
    /// A report that takes no budget (ack, outcome).
    pub(crate) fn control(key: AttemptKey, report: pb::WorkerReport) -> Self {
        let is_outcome = matches!(report.kind, Some(pb::worker_report::Kind::Outcome(_)));
        Queued {
            key,
            report,
            is_outcome,
            _permit: None,
        }
    }

    /// Whether this is an ack.
    pub(crate) fn is_ack(&self) -> bool {
        matches!(self.report.kind, Some(pb::worker_report::Kind::Ack(_)))
    }
}

struct State {
    queue: VecDeque<Queued>,
    /// Bumped whenever a session ends or starts, so that the stream of a dead session stops
    /// taking reports that the next session must send.
    epoch: u64,
    /// Taken by the stream of the current epoch, not yet handed to the transport.
    in_flight: Vec<Queued>,
    /// Attempts whose reports, other than their outcome, are no longer sent.
    muted: HashSet<AttemptKey>,
}

/// See the module docs.
pub(crate) struct Outbox {
    state: Mutex<State>,
    notify: Notify,
    budget: Arc<Semaphore>,
    budget_bytes: usize,
}

impl Outbox {
    /// An empty outbox whose progress and output hold at most `budget_bytes`.
    pub(crate) fn new(budget_bytes: usize) -> Self {
        let budget_bytes = budget_bytes.clamp(1, Semaphore::MAX_PERMITS);
        Outbox {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                epoch: 0,
                in_flight: Vec::new(),
                muted: HashSet::new(),
            }),
            notify: Notify::new(),
            budget: Arc::new(Semaphore::new(budget_bytes)),
            budget_bytes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the queue inconsistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a report that takes no budget. An ack of a muted attempt is dropped.
    pub(crate) fn push(&self, item: Queued) {
        {
            let mut st = self.lock();
            if !item.is_outcome && st.muted.contains(&item.key) {
                return;
            }
            st.queue.push_back(item);
        }
        self.notify.notify_one();
    }

    /// Queues progress or output, waiting for budget first. Returns false if the report was not
    /// queued: the outbox is closed, or the attempt is muted.
    pub(crate) async fn push_bulk(&self, key: AttemptKey, report: pb::WorkerReport) -> bool {
        if self.lock().muted.contains(&key) {
            return false;
        }
        let size = report.encoded_len().clamp(1, self.budget_bytes);
        let permits = u32::try_from(size).unwrap_or(u32::MAX);
        let Ok(permit) = self.budget.clone().acquire_many_owned(permits).await else {
            return false;
        };
        {
            let mut st = self.lock();
            // Muted while this report waited for budget.
            if st.muted.contains(&key) {
                return false;
            }
            st.queue.push_back(Queued {
                key,
                report,
                is_outcome: false,
                _permit: Some(permit),
            });
        }
        self.notify.notify_one();
        true
    }

    /// Starts a new epoch: the stream of the previous session stops at its next batch, and what
    /// it had in flight goes back to the front of the queue, in order.
    pub(crate) fn next_epoch(&self) -> u64 {
        let epoch = {
            let mut st = self.lock();
            st.epoch += 1;
            let in_flight = std::mem::take(&mut st.in_flight);
            for item in in_flight.into_iter().rev() {
                if item.is_outcome || !st.muted.contains(&item.key) {
                    st.queue.push_front(item);
                }
            }
            st.epoch
        };
        self.notify.notify_waiters();
        epoch
    }

    /// Waits for reports and takes a batch of them, or returns `None` once `epoch` is over. The
    /// batch stays in flight until [`Outbox::handed_over`].
    pub(crate) async fn next_batch(&self, epoch: u64) -> Option<Vec<pb::WorkerReport>> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Registered before looking at the queue, so no wake-up is lost in between.
            notified.as_mut().enable();
            {
                let mut st = self.lock();
                if st.epoch != epoch {
                    drop(st);
                    // This stream may have consumed a wake-up meant for the new session's.
                    self.notify.notify_one();
                    return None;
                }
                if !st.queue.is_empty() {
                    let st = &mut *st;
                    return Some(take_batch(&mut st.queue, &mut st.in_flight));
                }
            }
            notified.await;
        }
    }

    /// The stream of `epoch` has handed everything it took to the transport: those reports are
    /// no longer sent again if the session ends (and their budget is released).
    pub(crate) fn handed_over(&self, epoch: u64) {
        let released = {
            let mut st = self.lock();
            if st.epoch != epoch {
                return;
            }
            std::mem::take(&mut st.in_flight)
        };
        // Dropped outside the lock: releasing budget may wake handlers.
        drop(released);
    }

    /// Stops sending the attempt's reports except its outcome: queued ones are dropped, new
    /// ones refused, until [`Outbox::unmute`].
    pub(crate) fn mute(&self, key: &AttemptKey) {
        let dropped: VecDeque<Queued> = {
            let mut st = self.lock();
            st.muted.insert(key.clone());
            let (keep, dropped) = std::mem::take(&mut st.queue)
                .into_iter()
                .partition(|q| q.is_outcome || q.key != *key);
            st.queue = keep;
            dropped
        };
        drop(dropped);
    }

    /// Forgets a muted attempt (once the run loop forgot it too).
    pub(crate) fn unmute(&self, key: &AttemptKey) {
        self.lock().muted.remove(key);
    }

    /// After a reconnect: keeps the queued reports `keep` accepts, puts `front` before them and
    /// `back` after them.
    pub(crate) fn reconcile(
        &self,
        keep: impl Fn(&Queued) -> bool,
        front: Vec<Queued>,
        back: Vec<Queued>,
    ) {
        let dropped: VecDeque<Queued> = {
            let mut st = self.lock();
            let (kept, dropped): (VecDeque<Queued>, VecDeque<Queued>) =
                std::mem::take(&mut st.queue)
                    .into_iter()
                    .partition(|q| keep(q));
            st.queue = front.into_iter().collect();
            st.queue.extend(kept);
            st.queue.extend(back);
            dropped
        };
        drop(dropped);
        self.notify.notify_one();
    }

    /// Number of queued reports.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().queue.len()
    }

    /// Wakes every handler waiting for budget: the worker is gone.
    pub(crate) fn close(&self) {
        self.budget.close();
    }
}

/// Moves a batch from the front of `queue` to `in_flight` and returns its reports.
fn take_batch(queue: &mut VecDeque<Queued>, in_flight: &mut Vec<Queued>) -> Vec<pb::WorkerReport> {
    let mut batch = Vec::new();
    let mut bytes = 0usize;
    while let Some(front) = queue.front() {
        let size = front.report.encoded_len() + 4;
        if !batch.is_empty() && (bytes + size > MAX_BATCH_BYTES || batch.len() >= MAX_BATCH_REPORTS)
        {
            break;
        }
        bytes += size;
        if let Some(item) = queue.pop_front() {
            // Payloads are `Bytes`: the copy kept in flight shares them.
            batch.push(item.report.clone());
            in_flight.push(item);
        }
    }
    batch
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn key(id: &str) -> AttemptKey {
        AttemptKey::new(id, 1)
    }

    fn output(id: &str, len: usize) -> pb::WorkerReport {
        pb::WorkerReport {
            job_id: id.into(),
            attempt: 1,
            kind: Some(pb::worker_report::Kind::Output(pb::Output {
                stream: pb::OutputStream::Stdout as i32,
                data: vec![b'x'; len].into(),
                attempt: 1,
                truncated: false,
            })),
        }
    }

    fn ack(id: &str) -> pb::WorkerReport {
        pb::WorkerReport {
            job_id: id.into(),
            attempt: 1,
            kind: Some(pb::worker_report::Kind::Ack(pb::Ack {})),
        }
    }

    #[tokio::test]
    async fn batches_everything_queued_in_order() {
        let outbox = Outbox::new(1 << 20);
        let epoch = outbox.next_epoch();
        outbox.push(Queued::control(key("a"), ack("a")));
        assert!(outbox.push_bulk(key("a"), output("a", 10)).await);
        outbox.push(Queued::control(key("b"), ack("b")));
        let batch = outbox.next_batch(epoch).await.unwrap();
        assert_eq!(batch.len(), 3);
        assert_eq!(batch[0].job_id, "a");
        assert!(matches!(
            batch[1].kind,
            Some(pb::worker_report::Kind::Output(_))
        ));
        assert_eq!(batch[2].job_id, "b");
    }

    #[tokio::test]
    async fn big_batches_are_split() {
        let outbox = Outbox::new(8 << 20);
        let epoch = outbox.next_epoch();
        for _ in 0..40 {
            assert!(outbox.push_bulk(key("a"), output("a", 64 << 10)).await);
        }
        let first = outbox.next_batch(epoch).await.unwrap();
        assert!(first.len() < 40 && !first.is_empty());
        let total: usize = first.iter().map(Message::encoded_len).sum();
        assert!(total <= MAX_BATCH_BYTES);
    }

    #[tokio::test]
    async fn output_waits_for_budget() {
        let outbox = Arc::new(Outbox::new(1000));
        let epoch = outbox.next_epoch();
        assert!(outbox.push_bulk(key("a"), output("a", 900)).await);
        let blocked = {
            let outbox = outbox.clone();
            tokio::spawn(async move { outbox.push_bulk(key("a"), output("a", 900)).await })
        };
        // The second chunk cannot be queued until the first one has been handed over.
        tokio::task::yield_now().await;
        assert_eq!(outbox.len(), 1);
        assert!(!blocked.is_finished());
        let batch = outbox.next_batch(epoch).await.unwrap();
        assert_eq!(batch.len(), 1);
        // Taken but still in flight: its budget is held.
        tokio::task::yield_now().await;
        assert!(!blocked.is_finished());
        outbox.handed_over(epoch);
        assert!(tokio::time::timeout(Duration::from_secs(5), blocked)
            .await
            .unwrap()
            .unwrap());
        assert_eq!(outbox.next_batch(epoch).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn old_epochs_stop_and_hand_over() {
        let outbox = Arc::new(Outbox::new(1 << 20));
        let old = outbox.next_epoch();
        let waiting = {
            let outbox = outbox.clone();
            tokio::spawn(async move { outbox.next_batch(old).await })
        };
        tokio::task::yield_now().await;
        let new = outbox.next_epoch();
        assert!(waiting.await.unwrap().is_none());
        outbox.push(Queued::control(key("a"), ack("a")));
        assert_eq!(outbox.next_batch(new).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn reconcile_filters_and_appends() {
        let outbox = Outbox::new(1 << 20);
        let epoch = outbox.next_epoch();
        outbox.push(Queued::control(key("a"), ack("a")));
        outbox.push(Queued::control(key("b"), ack("b")));
        outbox.reconcile(
            |q| &*q.key.job_id == "b",
            vec![Queued::control(key("z"), ack("z"))],
            vec![Queued::control(key("c"), ack("c"))],
        );
        let batch = outbox.next_batch(epoch).await.unwrap();
        let ids: Vec<_> = batch.iter().map(|r| r.job_id.as_str()).collect();
        assert_eq!(ids, ["z", "b", "c"]);
    }

    fn ids(batch: &[pb::WorkerReport]) -> Vec<&str> {
        batch.iter().map(|r| r.job_id.as_str()).collect()
    }

    #[tokio::test]
    async fn in_flight_reports_go_back_to_the_front_when_the_session_ends() {
        let outbox = Outbox::new(1 << 20);
        let old = outbox.next_epoch();
        outbox.push(Queued::control(key("a"), ack("a")));
        assert!(outbox.push_bulk(key("a"), output("a", 10)).await);
        assert_eq!(outbox.next_batch(old).await.unwrap().len(), 2);
        // Queued after the batch was taken, while the stream was dying.
        outbox.push(Queued::control(key("b"), ack("b")));
        let new = outbox.next_epoch();
        // The dead stream's late hand-over changes nothing.
        outbox.handed_over(old);
        let batch = outbox.next_batch(new).await.unwrap();
        assert_eq!(ids(&batch), ["a", "a", "b"]);
        assert!(matches!(
            batch[1].kind,
            Some(pb::worker_report::Kind::Output(_))
        ));
    }

    #[tokio::test]
    async fn handed_over_reports_are_not_sent_again() {
        let outbox = Outbox::new(1 << 20);
        let epoch = outbox.next_epoch();
        outbox.push(Queued::control(key("a"), ack("a")));
        assert_eq!(outbox.next_batch(epoch).await.unwrap().len(), 1);
        outbox.handed_over(epoch);
        outbox.next_epoch();
        assert_eq!(outbox.len(), 0);
    }

    #[tokio::test]
    async fn muted_attempts_send_only_their_outcome() {
        let outbox = Outbox::new(1 << 20);
        let epoch = outbox.next_epoch();
        let outcome = pb::WorkerReport {
            job_id: "a".into(),
            attempt: 1,
            kind: Some(pb::worker_report::Kind::Outcome(pb::AttemptOutcome {
                kind: Some(pb::attempt_outcome::Kind::Cancelled(pb::Cancelled {})),
            })),
        };
        outbox.push(Queued::control(key("a"), ack("a")));
        assert!(outbox.push_bulk(key("a"), output("a", 10)).await);
        assert!(outbox.push_bulk(key("b"), output("b", 10)).await);
        outbox.mute(&key("a"));
        assert!(!outbox.push_bulk(key("a"), output("a", 10)).await);
        outbox.push(Queued::control(key("a"), ack("a")));
        outbox.push(Queued::control(key("a"), outcome));
        let batch = outbox.next_batch(epoch).await.unwrap();
        assert_eq!(ids(&batch), ["b", "a"]);
        assert!(matches!(
            batch[1].kind,
            Some(pb::worker_report::Kind::Outcome(_))
        ));
        // Muted while in flight: not sent again by the next session, except the outcome.
        assert!(outbox.push_bulk(key("c"), output("c", 10)).await);
        outbox.unmute(&key("a"));
        assert!(outbox.push_bulk(key("a"), output("a", 10)).await);
        assert_eq!(outbox.next_batch(epoch).await.unwrap().len(), 2);
        outbox.mute(&key("a"));
        let new = outbox.next_epoch();
        let batch = outbox.next_batch(new).await.unwrap();
        assert_eq!(ids(&batch), ["b", "a", "c"]);
    }

    #[tokio::test]
    async fn closing_releases_blocked_output() {
        let outbox = Arc::new(Outbox::new(10));
        assert!(outbox.push_bulk(key("a"), output("a", 100)).await);
        let blocked = {
            let outbox = outbox.clone();
            tokio::spawn(async move { outbox.push_bulk(key("a"), output("a", 5)).await })
        };
        tokio::task::yield_now().await;
        outbox.close();
        assert!(!blocked.await.unwrap());
    }
}
