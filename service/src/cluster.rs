//! An instance's life among the instances sharing one database: campaign for the lead while
//! forwarding calls to whoever leads; lead (run the engine) until the lead, the database or a
//! commit is lost; then step down, discard the in-memory state and campaign again — the next
//! leader, this instance or another, recovers from the database.
//!
//! On SQLite (no [`Coordinator`]) the instance always leads; a failed commit still makes it
//! step down and recover from the database after a back-off instead of running on with state
//! the database does not hold.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::api::Roles;
use crate::engine::{Engine, EngineConfig};
use crate::metrics::Metrics;
use crate::store::{Coordinator, Leadership, Store, StoreError};

/// How often a follower re-reads the leader record in case an announcement was missed (a lost
/// notification is not otherwise detected until a forwarded call fails).
const SAFETY_INTERVAL: Duration = Duration::from_secs(30);

/// First and longest pause before campaigning again after a failure.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The instance's loop; returns after `stop` is cancelled and, if it led, after `api_done`
/// (the server stopped accepting and in-flight calls ended), with the engine closed.
pub(crate) async fn run(
    store: Arc<dyn Store>,
    advertise: String,
    config: EngineConfig,
    metrics: Arc<Metrics>,
    roles: Arc<Roles>,
    stop: CancellationToken,
    api_done: CancellationToken,
) {
    roles.electing("starting").await;
    let coordinator = store.coordinator();
    let mut failures: u32 = 0;
    loop {
        if failures > 0 {
            let pause = backoff(failures);
            tracing::info!(?pause, "campaigning again after a back-off");
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.cancelled() => break,
            }
        }
        let mut lead: Option<Box<dyn Leadership>> = match &coordinator {
            None => None,
            Some(c) => match campaign(c.as_ref(), &advertise, &roles, &stop).await {
                Ok(Some(l)) => Some(l),
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "the database is unavailable; not serving");
                    roles
                        .down(&format!("the database is unavailable: {e}"))
                        .await;
                    failures += 1;
                    continue;
                }
            },
        };
        let epoch = lead.as_ref().map_or(0, |l| l.epoch());
        let generation = stop.child_token();
        let (engine, tasks) = match Engine::start(
            store.clone(),
            config.clone(),
            metrics.clone(),
            generation.clone(),
        )
        .await
        {
            Ok(started) => started,
            Err(e) => {
                tracing::warn!(error = %e, "cannot recover from the database; not serving");
                roles.down("recovering from the database").await;
                if let Some(l) = lead {
                    l.resign().await;
                }
                failures += 1;
                continue;
            }
        };
        roles.lead(engine.clone()).await;
        if coordinator.is_some() {
            tracing::info!(epoch, addr = %advertise, "leading");
        }
        failures = 0;
        let lost = async {
            match lead.as_mut() {
                Some(l) => l.lost().await,
                None => std::future::pending().await,
            }
        };
        let why = tokio::select! {
            _ = stop.cancelled() => None,
            _ = engine.fatal.cancelled() => Some("a commit failed".to_owned()),
            why = lost => Some(why),
        };
        match &why {
            None => {
                // Shutting down: the server stops accepting and lets in-flight calls finish
                // (the engine's streams and waits end with `stop`); then the engine closes.
                api_done.cancelled().await;
            }
            Some(why) => {
                tracing::warn!(epoch, reason = %why, "stepping down; the next leader recovers from the database");
                roles
                    .down(&format!("this instance stepped down ({why})"))
                    .await;
                generation.cancel();
            }
        }
        engine.close().await;
        tasks.join().await;
        if let Some(l) = lead {
            l.resign().await;
        }
        if why.is_none() {
            return;
        }
        failures += 1;
    }
    roles.down("shutting down").await;
}

/// Follows whoever leads until this instance takes the lead (`Some`) or `stop` (`None`).
async fn campaign(
    c: &dyn Coordinator,
    me: &str,
    roles: &Roles,
    stop: &CancellationToken,
) -> Result<Option<Box<dyn Leadership>>, StoreError> {
    let mut watch = c.watch().await?;
    let mut known = follow_current(c, me, roles).await?;
    let lead = c.lead(me);
    tokio::pin!(lead);
    let mut safety = tokio::time::interval_at(
        tokio::time::Instant::now() + SAFETY_INTERVAL,
        SAFETY_INTERVAL,
    );
    loop {
        tokio::select! {
            r = &mut lead => return r.map(Some),
            r = watch.changed() => {
                r?;
                known = follow_current(c, me, roles).await?;
            }
            _ = roles.upstream_failed() => {
                known = follow_current(c, me, roles).await?;
            }
            _ = safety.tick() => {
                let now = follow_current(c, me, roles).await?;
                if now != known {
                    tracing::warn!(
                        before = ?known, now = ?now,
                        "the leader changed without its announcement reaching this instance \
                         (the safety re-read caught it)"
                    );
                }
                known = now;
            }
            _ = stop.cancelled() => return Ok(None),
        }
    }
}

/// Points the forwarding at the leader on record; returns its epoch.
async fn follow_current(
    c: &dyn Coordinator,
    me: &str,
    roles: &Roles,
) -> Result<Option<u64>, StoreError> {
    match c.leader().await? {
        Some(info) if info.addr != me => {
            match roles.follow(&info.addr).await {
                Ok(true) => tracing::info!(leader = %info.addr, epoch = info.epoch, "following"),
                Ok(false) => {}
                Err(e) => roles.down(&e).await,
            }
            Ok(Some(info.epoch))
        }
        // None yet, or this instance's own stale record: it takes the lead in a moment.
        info => {
            roles.electing("electing a leader").await;
            Ok(info.map(|i| i.epoch))
        }
    }
}

/// Jittered exponential back-off in `[d/2, d]`, `d = BACKOFF_MIN · 2^(n-1)` capped.
fn backoff(failures: u32) -> Duration {
    let factor = 1u32
        .checked_shl(failures.saturating_sub(1).min(31))
        .unwrap_or(u32::MAX);
    let d = BACKOFF_MIN.saturating_mul(factor).min(BACKOFF_MAX);
    let half = d / 2;
    half + (d - half).mul_f64(rand::random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        for n in 1..40 {
            let d = backoff(n);
            assert!(d >= BACKOFF_MIN / 2 && d <= BACKOFF_MAX, "{n}: {d:?}");
        }
        assert!(backoff(30) >= BACKOFF_MAX / 2);
    }
}

#[cfg(test)]
mod recovery_tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use async_trait::async_trait;
    use jobplane::JobSpec;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    use super::*;
    use crate::engine::model::{Event, Job, JobFilter, JobId, Timestamp};
    use crate::store::{Recovered, Write};

    /// A store whose next commit fails when asked to.
    struct Flaky {
        inner: Arc<dyn Store>,
        fail_next: AtomicBool,
    }

    #[async_trait]
    impl Store for Flaky {
        async fn apply(&self, writes: &[Write]) -> Result<(), StoreError> {
            if self.fail_next.swap(false, Ordering::SeqCst) {
                return Err(StoreError::Unavailable("injected failure".into()));
            }
            self.inner.apply(writes).await
        }
        async fn recover(&self) -> Result<Recovered, StoreError> {
            self.inner.recover().await
        }
        async fn get_job(&self, id: JobId) -> Result<Option<Job>, StoreError> {
            self.inner.get_job(id).await
        }
        async fn get_jobs(&self, ids: &[JobId]) -> Result<Vec<Job>, StoreError> {
            self.inner.get_jobs(ids).await
        }
        async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<Job>, StoreError> {
            self.inner.list_jobs(filter).await
        }
        async fn events(
            &self,
            id: JobId,
            after: u64,
            limit: u32,
        ) -> Result<Vec<Event>, StoreError> {
            self.inner.events(id, after, limit).await
        }
        async fn prune_finished(&self, before: Timestamp, limit: u32) -> Result<u64, StoreError> {
            self.inner.prune_finished(before, limit).await
        }
        async fn ping(&self) -> Result<(), StoreError> {
            self.inner.ping().await
        }
        async fn close(&self) {
            self.inner.close().await
        }
    }

    /// Waits (30 s guard) until health reports `want` for the job service.
    async fn health_becomes(
        health: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
        want: ServingStatus,
    ) {
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let status = health.message().await.unwrap().expect("health stream open");
                if status.status() == want {
                    return;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("health never became {want:?}"));
    }

    /// A failed commit: the call is answered UNAVAILABLE, the instance steps down (health
    /// NOT_SERVING), recovers from the database and serves again, with what was committed.
    #[tokio::test]
    async fn a_failed_commit_steps_down_and_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("jobplane.db").display());
        let store = Arc::new(Flaky {
            inner: crate::store::open(&url).await.unwrap(),
            fail_next: AtomicBool::new(false),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(crate::run(
            listener,
            store.clone(),
            EngineConfig::default(),
            async {
                let _ = stop_rx.await;
            },
        ));
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut health = HealthClient::new(channel)
            .watch(HealthCheckRequest {
                service: "jobplane.v1.JobService".into(),
            })
            .await
            .unwrap()
            .into_inner();
        health_becomes(&mut health, ServingStatus::Serving).await;
        let client = jobplane::Client::connect(addr.to_string()).await.unwrap();
        let kept = client.submit(JobSpec::new("q")).await.unwrap();

        store.fail_next.store(true, Ordering::SeqCst);
        let err = client.submit(JobSpec::new("q")).await.unwrap_err();
        assert!(
            matches!(err, jobplane::Error::Unavailable { .. }),
            "{err:?}"
        );
        health_becomes(&mut health, ServingStatus::NotServing).await;
        health_becomes(&mut health, ServingStatus::Serving).await;

        let again = client.submit(JobSpec::new("q")).await.unwrap();
        let jobs = client.list(Default::default()).await.unwrap();
        let ids: Vec<_> = jobs.jobs.iter().map(|j| j.id.clone()).collect();
        assert!(
            ids.contains(&kept.job.id) && ids.contains(&again.job.id),
            "{ids:?}"
        );
        assert_eq!(
            ids.len(),
            2,
            "the failed submit left nothing behind: {ids:?}"
        );

        // (An open health watch would hold the graceful shutdown.)
        drop((health, client));
        let _ = stop_tx.send(());
        tokio::time::timeout(Duration::from_secs(30), server)
            .await
            .expect("the server stopped")
            .unwrap()
            .unwrap();
    }
}
