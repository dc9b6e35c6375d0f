//! The job state machine: the one place that decides which state changes are allowed.
//!
//! Every change of a job's state in the engine goes through [`transition`]. The table is one
//! exhaustive `match` with no catch-all arm, so adding a state or a trigger forces a decision for
//! every pair. See `docs/state_machine.md` for the diagram.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Where a job is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobState {
    /// Not running yet: scheduled for later, backing off, or waiting for a slot or a worker.
    Queued,
    /// Assigned to a worker that has not acknowledged it; goes back to `Queued` if the
    /// acknowledgement does not come in time, without using the retry budget.
    Leased,
    /// Acknowledged and running on a worker.
    Running,
    /// Finished with a result. Terminal.
    Succeeded,
    /// Failed for good (non-retryable, or out of retries, or the worker was lost too often).
    /// Terminal.
    Failed,
    /// Cancelled by a client. Terminal.
    Cancelled,
    /// The last attempt ran past its run timeout and no retry was left. Terminal.
    TimedOut,
    /// Its max wait for dispatch ran out. Terminal.
    Expired,
}

impl JobState {
    /// All states, in lifecycle order.
    pub const ALL: [JobState; 8] = [
        JobState::Queued,
        JobState::Leased,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
        JobState::TimedOut,
        JobState::Expired,
    ];

    /// Whether the state is final.
    pub fn is_terminal(self) -> bool {
        match self {
            JobState::Queued | JobState::Leased | JobState::Running => false,
            JobState::Succeeded
            | JobState::Failed
            | JobState::Cancelled
            | JobState::TimedOut
            | JobState::Expired => true,
        }
    }

    /// The name used in the database and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "QUEUED",
            JobState::Leased => "LEASED",
            JobState::Running => "RUNNING",
            JobState::Succeeded => "SUCCEEDED",
            JobState::Failed => "FAILED",
            JobState::Cancelled => "CANCELLED",
            JobState::TimedOut => "TIMED_OUT",
            JobState::Expired => "EXPIRED",
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|st| st.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown job state {s:?}"))
    }
}

/// What happens to a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Trigger {
    /// The scheduler assigns it to a worker.
    Dispatch,
    /// The worker acknowledges the assignment.
    Ack,
    /// The acknowledgement did not come in time.
    AckTimeout,
    /// The attempt succeeded.
    Succeed,
    /// The attempt failed and will be retried.
    Retry,
    /// The attempt failed and will not be retried.
    Fail,
    /// The attempt ran past its run timeout and no retry is left.
    TimeOut,
    /// A client cancelled it (queued: at once; running: confirmed by the worker or forced).
    Cancel,
    /// Its max wait for dispatch ran out.
    Expire,
    /// The worker reported an upstream rate limit; back to the queue without using retries.
    RateLimited,
}

impl Trigger {
    /// All triggers, for table tests.
    pub const ALL: [Trigger; 10] = [
        Trigger::Dispatch,
        Trigger::Ack,
        Trigger::AckTimeout,
        Trigger::Succeed,
        Trigger::Retry,
        Trigger::Fail,
        Trigger::TimeOut,
        Trigger::Cancel,
        Trigger::Expire,
        Trigger::RateLimited,
    ];
}

/// A transition the state machine does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid transition: {trigger:?} in state {from}")]
pub struct InvalidTransition {
    /// The state the job was in.
    pub from: JobState,
    /// What was attempted.
    pub trigger: Trigger,
}

/// The transition table.
///
/// An outcome reported without an acknowledgement (a fast worker's ack and outcome in one batch
/// are handled in order, but a worker may also skip the ack) is accepted from `Leased` too.
pub fn transition(from: JobState, trigger: Trigger) -> Result<JobState, InvalidTransition> {
    use JobState::*;
    use Trigger::*;
    let to = match (from, trigger) {
        (Queued, Dispatch) => Leased,
        (Queued, Cancel) => Cancelled,
        (Queued, Expire) => Expired,
        (Queued, Ack | AckTimeout | Succeed | Retry | Fail | TimeOut | RateLimited) => {
            return Err(InvalidTransition { from, trigger })
        }

        (Leased, Ack) => Running,
        (Leased, AckTimeout) => Queued,
        (Leased, Succeed) => Succeeded,
        (Leased, Retry | RateLimited) => Queued,
        (Leased, Fail) => Failed,
        (Leased, Cancel) => Cancelled,
        (Leased, Dispatch | TimeOut | Expire) => return Err(InvalidTransition { from, trigger }),

        (Running, Succeed) => Succeeded,
        (Running, Retry | RateLimited) => Queued,
        (Running, Fail) => Failed,
        (Running, TimeOut) => TimedOut,
        (Running, Cancel) => Cancelled,
        (Running, Dispatch | Ack | AckTimeout | Expire) => {
            return Err(InvalidTransition { from, trigger })
        }

        (
            Succeeded | Failed | Cancelled | TimedOut | Expired,
            Dispatch | Ack | AckTimeout | Succeed | Retry | Fail | TimeOut | Cancel | Expire
            | RateLimited,
        ) => return Err(InvalidTransition { from, trigger }),
    };
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole table, written out once more as the expected answer for every pair.
    #[test]
    fn table_covers_every_pair() {
        use JobState::*;
        use Trigger::*;
        let allowed: &[(JobState, Trigger, JobState)] = &[
            (Queued, Dispatch, Leased),
            (Queued, Cancel, Cancelled),
            (Queued, Expire, Expired),
            (Leased, Ack, Running),
            (Leased, AckTimeout, Queued),
            (Leased, Succeed, Succeeded),
            (Leased, Retry, Queued),
            (Leased, RateLimited, Queued),
            (Leased, Fail, Failed),
            (Leased, Cancel, Cancelled),
            (Running, Succeed, Succeeded),
            (Running, Retry, Queued),
            (Running, RateLimited, Queued),
            (Running, Fail, Failed),
            (Running, TimeOut, TimedOut),
            (Running, Cancel, Cancelled),
        ];
        for from in JobState::ALL {
            for trigger in Trigger::ALL {
                let expected = allowed
                    .iter()
                    .find(|(f, t, _)| *f == from && *t == trigger)
                    .map(|(_, _, to)| *to);
                match (transition(from, trigger), expected) {
                    (Ok(to), Some(exp)) => assert_eq!(to, exp, "{from:?} x {trigger:?}"),
                    (Err(e), None) => assert_eq!(e, InvalidTransition { from, trigger }),
                    (got, exp) => panic!("{from:?} x {trigger:?}: got {got:?}, expected {exp:?}"),
                }
            }
        }
    }

    #[test]
    fn terminal_states_accept_nothing() {
        for from in JobState::ALL.into_iter().filter(|s| s.is_terminal()) {
            for trigger in Trigger::ALL {
                assert!(transition(from, trigger).is_err());
            }
        }
    }

    #[test]
    fn names_round_trip() {
        for s in JobState::ALL {
            assert_eq!(s.as_str().parse::<JobState>().unwrap(), s);
        }
        assert!("NOPE".parse::<JobState>().is_err());
    }
}
