//! Property tests of the engine core: random interleavings of completions, failures, cancels,
//! timeouts, lost workers, reconnects and late zombie reports. Whatever the order, every job
//! ends exactly once, nothing happens to it after that, versions and sequence numbers advance
//! one by one, and the queue and worker books stay consistent.

use std::collections::HashMap;
use std::time::Duration;

use proptest::prelude::*;
use tokio::sync::mpsc;

use super::commit::Outbox;
use super::core::{Core, Submitted};
use super::model::*;
use super::timers::Timer;
use super::*;
use crate::store::Write;

#[derive(Debug, Clone)]
enum Op {
    Ack {
        job: usize,
        stale: bool,
    },
    Succeed {
        job: usize,
        stale: bool,
    },
    Fail {
        job: usize,
        retryable: bool,
        stale: bool,
    },
    WorkerCancelled {
        job: usize,
    },
    RateLimited {
        job: usize,
    },
    Cancel {
        job: usize,
    },
    AckTimeout {
        job: usize,
    },
    RunTimeout {
        job: usize,
    },
    CancelGrace {
        job: usize,
    },
    Ready {
        job: usize,
    },
    MaxWait {
        job: usize,
    },
    LoseWorker {
        worker: usize,
    },
    Reconnect {
        worker: usize,
        keep: bool,
    },
}

fn op(jobs: usize) -> impl Strategy<Value = Op> {
    let j = 0..jobs;
    prop_oneof![
        (j.clone(), any::<bool>()).prop_map(|(job, stale)| Op::Ack { job, stale }),
        (j.clone(), any::<bool>()).prop_map(|(job, stale)| Op::Succeed { job, stale }),
        (j.clone(), any::<bool>(), any::<bool>()).prop_map(|(job, retryable, stale)| Op::Fail {
            job,
            retryable,
            stale
        }),
        j.clone().prop_map(|job| Op::WorkerCancelled { job }),
        j.clone().prop_map(|job| Op::RateLimited { job }),
        j.clone().prop_map(|job| Op::Cancel { job }),
        j.clone().prop_map(|job| Op::AckTimeout { job }),
        j.clone().prop_map(|job| Op::RunTimeout { job }),
        j.clone().prop_map(|job| Op::CancelGrace { job }),
        j.clone().prop_map(|job| Op::Ready { job }),
        j.prop_map(|job| Op::MaxWait { job }),
        (0..2usize).prop_map(|worker| Op::LoseWorker { worker }),
        (0..2usize, any::<bool>()).prop_map(|(worker, keep)| Op::Reconnect { worker, keep }),
    ]
}

/// What the log of writes says about each job.
#[derive(Default)]
struct Ledger {
    version: HashMap<JobId, u64>,
    seq: HashMap<JobId, u64>,
    terminal: HashMap<JobId, usize>,
}

impl Ledger {
    fn absorb(&mut self, out: &mut Outbox) {
        for w in out.writes.drain(..) {
            match w {
                Write::InsertJob(j) => {
                    assert!(self.version.insert(j.id, j.version).is_none());
                }
                Write::UpdateJob {
                    job,
                    expected_version,
                } => {
                    let v = self
                        .version
                        .get_mut(&job.id)
                        .expect("update of a known job");
                    assert_eq!(*v, expected_version, "versions advance one by one");
                    assert_eq!(job.version, expected_version + 1);
                    assert_eq!(
                        self.terminal.get(&job.id).copied().unwrap_or(0),
                        0,
                        "no change after the terminal state"
                    );
                    *v = job.version;
                }
                Write::Event(e) => {
                    let s = self.seq.entry(e.job_id).or_insert(0);
                    assert_eq!(e.seq, *s + 1, "event sequence has no gaps");
                    *s = e.seq;
                    if e.is_terminal() {
                        *self.terminal.entry(e.job_id).or_insert(0) += 1;
                    }
                }
                Write::PutIdempotency(_)
                | Write::DeleteIdempotency { .. }
                | Write::PutQueue { .. }
                | Write::PutPool { .. }
                | Write::DeletePool { .. }
                | Write::PoolCooldown { .. } => {}
            }
        }
        out.effects.clear();
    }
}

struct World {
    core: Core,
    sessions: Vec<WorkerSession>,
    rxs: Vec<mpsc::UnboundedReceiver<ToWorker>>,
    ids: Vec<JobId>,
    ledger: Ledger,
}

fn hello(i: usize, running: Vec<(JobId, u32)>) -> WorkerHello {
    WorkerHello {
        worker_id: WorkerId(format!("w{i}").into()),
        namespace: Name::default_namespace(),
        queues: vec![Name::parse("q").unwrap()],
        concurrency: 2,
        labels: Default::default(),
        resources: Default::default(),
        name: String::new(),
        running,
    }
}

impl World {
    fn new(jobs: usize) -> World {
        let mut core = Core::new(EngineConfig::default());
        let now = Timestamp::now();
        let mut out = Outbox::default();
        let mut sessions = Vec::new();
        let mut rxs = Vec::new();
        for i in 0..2 {
            let (tx, rx) = mpsc::unbounded_channel();
            sessions.push(
                core.connect_worker(hello(i, vec![]), tx, now, &mut out)
                    .unwrap(),
            );
            rxs.push(rx);
        }
        let specs = (0..jobs)
            .map(|i| JobSpec {
                namespace: Name::default_namespace(),
                queue: Name::parse("q").unwrap(),
                payload: Default::default(),
                labels: Default::default(),
                priority: (i % 3) as i32,
                idempotency_key: None,
                run_timeout: Some(Duration::from_secs(60)),
                max_wait: Some(Duration::from_secs(60)),
                retry_policy: Some(RetryPolicy {
                    max_retries: 2,
                    initial_backoff: Duration::from_millis(10),
                    max_backoff: Duration::from_millis(100),
                    multiplier: 2.0,
                }),
                scheduled_at: None,
                demand: Default::default(),
                trace: None,
            })
            .collect();
        let ids = core
            .submit(specs, now, &mut out)
            .unwrap()
            .into_iter()
            .map(|s| match s {
                Submitted::Created(j) => j.id,
                Submitted::Existing(_) => unreachable!("no idempotency keys here"),
            })
            .collect();
        let mut w = World {
            core,
            sessions,
            rxs,
            ids,
            ledger: Ledger::default(),
        };
        w.ledger.absorb(&mut out);
        w
    }

    fn holder(&self, id: JobId) -> Option<(usize, u32)> {
        let job = self.core.active_job(id)?;
        let wid = job.worker_id.as_ref()?;
        let i = self.sessions.iter().position(|s| &s.worker_id == wid)?;
        Some((i, job.attempt))
    }

    fn report(&mut self, job: usize, stale: bool, kind: ReportKind) {
        let id = self.ids[job];
        let Some((w, attempt)) = self.holder(id) else {
            // Not held: a late report from whoever held it last must be rejected.
            let mut out = Outbox::default();
            let before = self.core.active_job(id);
            self.core.reports(
                &self.sessions[0].clone(),
                vec![Report {
                    job_id: id,
                    attempt: 1,
                    kind,
                }],
                Timestamp::now(),
                &mut out,
            );
            if let Some(b) = before {
                if b.state == JobState::Queued {
                    assert_eq!(self.core.active_job(id).map(|j| j.version), Some(b.version));
                }
            }
            self.ledger.absorb(&mut out);
            return;
        };
        let (session, attempt) = if stale {
            // A zombie: the other worker, or an older attempt of the same one.
            if attempt > 1 {
                (self.sessions[w].clone(), attempt - 1)
            } else {
                (self.sessions[1 - w].clone(), attempt)
            }
        } else {
            (self.sessions[w].clone(), attempt)
        };
        let before = self.core.active_job(id).map(|j| j.version);
        let mut out = Outbox::default();
        self.core.reports(
            &session,
            vec![Report {
                job_id: id,
                attempt,
                kind,
            }],
            Timestamp::now(),
            &mut out,
        );
        if stale {
            assert_eq!(
                self.core.active_job(id).map(|j| j.version),
                before,
                "a zombie's report changes nothing"
            );
        }
        self.ledger.absorb(&mut out);
    }

    fn fire(&mut self, t: Timer) {
        let mut out = Outbox::default();
        self.core.fire(t, Timestamp::now(), &mut out);
        self.ledger.absorb(&mut out);
    }

    fn attempt(&self, job: usize) -> u32 {
        self.core.active_job(self.ids[job]).map_or(0, |j| j.attempt)
    }

    async fn step(&mut self, op: Op) {
        match op {
            Op::Ack { job, stale } => self.report(job, stale, ReportKind::Ack),
            Op::Succeed { job, stale } => self.report(
                job,
                stale,
                ReportKind::Outcome(Outcome::Success(bytes::Bytes::from_static(b"ok"))),
            ),
            Op::Fail {
                job,
                retryable,
                stale,
            } => self.report(
                job,
                stale,
                ReportKind::Outcome(Outcome::Failure {
                    message: "boom".into(),
                    retryable,
                }),
            ),
            Op::WorkerCancelled { job } => {
                self.report(job, false, ReportKind::Outcome(Outcome::Cancelled))
            }
            Op::RateLimited { job } => self.report(
                job,
                false,
                ReportKind::Outcome(Outcome::RateLimited {
                    pool: None,
                    retry_after: Duration::from_millis(5),
                }),
            ),
            Op::Cancel { job } => {
                let mut out = Outbox::default();
                self.core.cancel(
                    &Name::default_namespace(),
                    self.ids[job],
                    Duration::from_secs(1),
                    "",
                    Timestamp::now(),
                    &mut out,
                );
                self.ledger.absorb(&mut out);
            }
            Op::AckTimeout { job } => {
                let a = self.attempt(job);
                self.fire(Timer::AckTimeout(self.ids[job], a))
            }
            Op::RunTimeout { job } => {
                let a = self.attempt(job);
                self.fire(Timer::RunTimeout(self.ids[job], a))
            }
            Op::CancelGrace { job } => {
                let a = self.attempt(job);
                self.fire(Timer::CancelGrace(self.ids[job], a))
            }
            Op::Ready { job } => self.fire(Timer::Ready(self.ids[job])),
            Op::MaxWait { job } => self.fire(Timer::MaxWait(self.ids[job])),
            Op::LoseWorker { worker } => {
                // The other worker keeps heartbeating; this one falls silent past its lease.
                tokio::time::advance(self.core.config.worker_lease_ttl + Duration::from_secs(1))
                    .await;
                let other = self.sessions[1 - worker].clone();
                self.core.heartbeat(&other);
                let wid = self.sessions[worker].worker_id.clone();
                self.fire(Timer::WorkerLease(wid));
                self.reconnect(worker, false);
            }
            Op::Reconnect { worker, keep } => self.reconnect(worker, keep),
        }
        self.core.check_invariants();
    }

    fn reconnect(&mut self, worker: usize, keep: bool) {
        let wid = self.sessions[worker].worker_id.clone();
        let running = if keep {
            self.ids
                .iter()
                .filter_map(|id| self.core.active_job(*id))
                .filter(|j| j.worker_id.as_ref() == Some(&wid))
                .map(|j| (j.id, j.attempt))
                .collect()
        } else {
            vec![]
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let mut out = Outbox::default();
        self.sessions[worker] = self
            .core
            .connect_worker(hello(worker, running), tx, Timestamp::now(), &mut out)
            .unwrap();
        self.rxs[worker] = rx;
        self.ledger.absorb(&mut out);
    }

    /// Ends every job still active, the way an operator would: cancel, then force.
    async fn finish(&mut self) {
        for job in 0..self.ids.len() {
            self.step(Op::Cancel { job }).await;
            self.step(Op::CancelGrace { job }).await;
            assert!(self.core.active_job(self.ids[job]).is_none());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_job_ends_exactly_once(ops in proptest::collection::vec(op(4), 1..80)) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let mut w = World::new(4);
            for op in ops {
                w.step(op).await;
            }
            w.finish().await;
            for id in &w.ids {
                assert_eq!(w.ledger.terminal.get(id).copied(), Some(1), "job {id} ends once");
            }
            // Drain the worker channels so nothing is left dangling.
            for rx in &mut w.rxs {
                while rx.try_recv().is_ok() {}
            }
        });
    }
}
