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
            roles.down("electing a leader").await;
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
