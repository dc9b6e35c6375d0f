//! Leadership among service instances that share one database.
//!
//! Exactly one instance leads: it runs the engine (scheduler, timers, commits); the others
//! forward calls to it. A [`Coordinator`] elects the leader and fences the one it deposes, so a
//! leader that lost its lease can never commit again.

use async_trait::async_trait;

use super::StoreError;

/// The leader on record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderInfo {
    /// Counts leaderships: each new leader has a higher one.
    pub epoch: u64,
    /// Where the leader serves the API (`http://HOST:PORT`).
    pub addr: String,
}

/// Elects one leader among the instances on one database.
#[async_trait]
pub trait Coordinator: Send + Sync + 'static {
    /// Waits until this instance leads (without polling: the database wakes it when the lead is
    /// free), then records it with a new epoch and `addr` and announces it. From then on the
    /// store commits only while that epoch is the latest one.
    async fn lead(&self, addr: &str) -> Result<Box<dyn Leadership>, StoreError>;

    /// The leader on record, if any instance ever led.
    async fn leader(&self) -> Result<Option<LeaderInfo>, StoreError>;

    /// Subscribes to announcements of new leaders.
    async fn watch(&self) -> Result<Box<dyn LeaderWatch>, StoreError>;
}

/// This instance's lead, held until dropped or lost.
#[async_trait]
pub trait Leadership: Send {
    /// The epoch this instance leads in.
    fn epoch(&self) -> u64;

    /// Resolves when the lead is lost (the session holding it ended), with why.
    async fn lost(&mut self) -> String;

    /// Gives the lead up, so another instance takes over at once.
    async fn resign(self: Box<Self>);
}

/// A subscription to leader announcements.
#[async_trait]
pub trait LeaderWatch: Send {
    /// Resolves when the leader may have changed: an announcement arrived, or the subscription
    /// was re-established after a lost connection (announcements may have been missed). The
    /// caller then reads [`Coordinator::leader`].
    async fn changed(&mut self) -> Result<(), StoreError>;
}
