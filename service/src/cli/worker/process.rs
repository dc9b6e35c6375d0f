//! The processes of `jobplane worker`'s commands.
//!
//! Each command runs in a process group of its own, so that a signal reaches whatever it
//! started. [`Groups`] registers every group that may still have live processes, so that the
//! worker can kill them all before exiting on a second signal. A [`Running`] command that is
//! dropped before the handler said it was over (the SDK aborted the handler: the cancel's grace
//! ended, the worker is stopping) still gets SIGTERM, then SIGKILL after [`MIN_KILL_GRACE`], in
//! a task of its own; a [`Group`] dropped without that chance (the runtime is going away) is
//! killed at once. Either way no command outlives its job.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, ChildStderr, ChildStdout, Command};
use tokio::time::Instant;

/// After SIGTERM, the least time a command gets before SIGKILL, whatever grace was asked for.
///
/// A run timeout or an ack timeout (or `cancel --grace 0s`) reaches the worker as a cancel with
/// no grace at all, after which the SDK drops the handler at once. Killing the command outright
/// would give it no chance to run its SIGTERM handler: to remove its lock and temporary files,
/// to pass the signal on to what it started, to flush what it wrote. A fraction of a second is
/// enough for that even on a loaded machine. It stays short because the service has already
/// ended the attempt and may start the next one elsewhere: half a second is no longer than the
/// shortest first retry back-off of the default retry policy (1 s with jitter down to 50%).
pub(super) const MIN_KILL_GRACE: Duration = Duration::from_millis(500);

/// The process groups of the commands running, shared by the job handlers.
#[derive(Default)]
pub(super) struct Groups {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Registered groups by entry number (a process group id could in theory be reused by a
    /// new command before the entry of the old one is removed).
    live: HashMap<u64, i32>,
    next: u64,
    /// Set by [`Groups::kill_all`]: no command starts any more.
    closed: bool,
}

impl Groups {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; a poisoned one is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts `command` (whose standard streams the caller set up) in a process group of its
    /// own, and registers the group.
    ///
    /// The lock is held while spawning, so that a command is either registered before
    /// [`Groups::kill_all`] looks, or not started at all.
    pub(super) fn spawn(self: &Arc<Self>, command: &mut Command) -> io::Result<Running> {
        #[cfg(unix)]
        {
            command.process_group(0);
            // The group is what gets signalled: dropping the child must not SIGKILL its leader
            // behind the group's back (see `Running`'s drop).
            command.kill_on_drop(false);
        }
        #[cfg(not(unix))]
        command.kill_on_drop(true);
        let mut state = self.lock();
        if state.closed {
            return Err(io::Error::other("the worker is exiting"));
        }
        let mut child = command.spawn()?;
        let pgid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .ok_or_else(|| io::Error::other("the started command has no process id"))?;
        let key = state.next;
        state.next += 1;
        state.live.insert(key, pgid);
        drop(state);
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        Ok(Running {
            child,
            stdout,
            stderr,
            group: Group {
                pgid,
                entry: Some((self.clone(), key)),
                term_sent: None,
            },
        })
    }

    /// Kills (SIGKILL) every registered group and refuses to start commands from now on, for a
    /// worker about to exit without running destructors. Returns how many groups there were.
    pub(super) fn kill_all(&self) -> usize {
        let mut state = self.lock();
        state.closed = true;
        for &pgid in state.live.values() {
            send(pgid, Sig::Kill);
        }
        state.live.len()
    }

    fn remove(&self, key: u64) {
        self.lock().live.remove(&key);
    }
}

/// A registered process group. Dropped while still registered, it is killed (SIGKILL) and
/// unregistered.
pub(super) struct Group {
    pgid: i32,
    /// Its entry in the registry; `None` once released or handed over.
    entry: Option<(Arc<Groups>, u64)>,
    term_sent: Option<Instant>,
}

impl Group {
    /// The process group id (the pid of the command's main process).
    pub(super) fn pgid(&self) -> i32 {
        self.pgid
    }

    /// Sends SIGTERM to the group, the first time only; returns when it was sent.
    pub(super) fn terminate(&mut self) -> Instant {
        *self.term_sent.get_or_insert_with(|| {
            send(self.pgid, Sig::Term);
            Instant::now()
        })
    }

    /// Sends SIGKILL to the group.
    pub(super) fn kill(&self) {
        send(self.pgid, Sig::Kill);
    }

    /// Moves the registration into a new value; dropping this one then does nothing.
    fn hand_over(&mut self) -> Option<Group> {
        let entry = self.entry.take()?;
        Some(Group {
            pgid: self.pgid,
            entry: Some(entry),
            term_sent: self.term_sent,
        })
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if let Some((groups, key)) = self.entry.take() {
            self.kill();
            groups.remove(key);
        }
    }
}

/// A command started by [`Groups::spawn`]: its main process, its output pipes, its group.
pub(super) struct Running {
    /// The main process (its standard input is still in it).
    pub(super) child: Child,
    pub(super) stdout: Option<ChildStdout>,
    pub(super) stderr: Option<ChildStderr>,
    pub(super) group: Group,
}

impl Running {
    /// The command is over: its group is no longer tracked, and is left alone.
    pub(super) fn release(&mut self) {
        if let Some((groups, key)) = self.group.entry.take() {
            groups.remove(key);
        }
    }

    /// Stops whatever is left of the command without waiting for it: SIGTERM now (unless sent
    /// already), SIGKILL [`MIN_KILL_GRACE`] after the SIGTERM. Its output is read and thrown
    /// away meanwhile, so that writing it does not kill it with SIGPIPE before it could handle
    /// the SIGTERM.
    pub(super) fn stop_in_background(&mut self) {
        let Some(mut group) = self.group.hand_over() else {
            return;
        };
        let stdout = self.stdout.take();
        let stderr = self.stderr.take();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime to wait in: dropping `group` kills it now.
            return;
        };
        // If the task never runs or is dropped half-way (the runtime shuts down), dropping
        // `group` kills it then.
        runtime.spawn(async move {
            let deadline = group.terminate() + MIN_KILL_GRACE;
            let discard = async {
                tokio::join!(discard(stdout), discard(stderr));
                std::future::pending::<()>().await;
            };
            let _ = tokio::time::timeout_at(deadline, discard).await;
            tracing::debug!(pgid = group.pgid(), "SIGKILL after SIGTERM");
            drop(group);
        });
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Still registered: the handler was dropped while the command may still run.
        if self.group.entry.is_some() {
            tracing::info!(
                pgid = self.group.pgid(),
                "handler stopped before the command: SIGTERM, then SIGKILL"
            );
            self.stop_in_background();
        }
    }
}

async fn discard<R: AsyncRead + Unpin>(reader: Option<R>) {
    let Some(mut reader) = reader else { return };
    let mut buf = vec![0u8; 16 << 10];
    while let Ok(n) = reader.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Sig {
    Term,
    Kill,
}

#[cfg(unix)]
fn send(pgid: i32, sig: Sig) {
    use nix::errno::Errno;
    use nix::sys::signal::{killpg, Signal};
    use nix::unistd::Pid;
    let signal = match sig {
        Sig::Term => Signal::SIGTERM,
        Sig::Kill => Signal::SIGKILL,
    };
    match killpg(Pid::from_raw(pgid), signal) {
        // ESRCH: every process of the group has ended already.
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(err) => {
            tracing::warn!(%err, pgid, signal = signal.as_str(), "cannot signal the command's process group");
        }
    }
}

/// Without process groups and signals, the command's main process is only killed when its
/// `Child` is dropped (`kill_on_drop`).
#[cfg(not(unix))]
fn send(_pgid: i32, _sig: Sig) {}

/// The name of signal number `signal` (`SIGKILL`), if it is one.
#[cfg(unix)]
pub(super) fn signal_name(signal: i32) -> Option<&'static str> {
    nix::sys::signal::Signal::try_from(signal)
        .ok()
        .map(nix::sys::signal::Signal::as_str)
}
