//! Closing what a task may control, off the threads that enforce limits.
//!
//! Closing a descriptor can block: a TCP socket with `SO_LINGER` and unsent
//! data waits in `close` until its data is acknowledged or the linger time
//! is over, and closing a unix socket also closes every descriptor queued
//! in it (the kernel finishes each close on the closing thread, on its way
//! back to user space). So whatever a task could have filled with
//! descriptors (our end of a fork-server child's socket) is closed by one
//! thread of its own, never by a thread that enforces a task's wall clock,
//! CPU time or cancellation, nor by one that shutdown waits for.
//!
//! A close stuck for longer than [`STUCK`] is interrupted: a watchdog sends
//! the closer thread [`interrupt_signal`], whose handler does nothing; a
//! lingering close stops waiting on a pending signal (the descriptor is
//! released all the same), so one task cannot hold the closer, and the
//! descriptors queued behind it, for its linger time.

use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long one close may wait before it is interrupted.
pub(crate) const STUCK: Duration = Duration::from_millis(500);

/// Something to drop on the closer thread.
type Item = Box<dyn Send>;

#[derive(Debug)]
struct Closer {
    tx: Sender<Item>,
}

/// When the closer thread began the drop it is in, if any.
#[derive(Debug, Default)]
struct Busy {
    since: Mutex<Option<Instant>>,
    changed: Condvar,
}

static CLOSER: OnceLock<Option<Closer>> = OnceLock::new();

/// The signal that interrupts a stuck close: a real-time one no library of
/// ours uses, sent only to the closer thread.
fn interrupt_signal() -> libc::c_int {
    libc::SIGRTMIN() + 6
}

extern "C" fn interrupted(_: libc::c_int) {}

/// Installs the do-nothing handler of [`interrupt_signal`], without
/// `SA_RESTART`.
fn install_handler() -> bool {
    // SAFETY: `sigaction` is given a zeroed, then filled, struct that lives
    // across the call; the handler is an `extern "C"` function that does
    // nothing (so it is async-signal-safe), and the signal is one nothing
    // else in the process handles.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = interrupted as extern "C" fn(libc::c_int) as libc::sighandler_t;
        action.sa_flags = 0;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(interrupt_signal(), &action, std::ptr::null_mut()) == 0
    }
}

fn start() -> Option<Closer> {
    let (tx, rx) = channel::<Item>();
    let busy = Arc::new(Busy::default());
    let busy_closer = Arc::clone(&busy);
    let closer = std::thread::Builder::new()
        .name("task-fd-closer".into())
        .spawn(move || {
            for item in rx {
                set(&busy_closer, Some(Instant::now()));
                drop(item);
                set(&busy_closer, None);
            }
        })
        .ok()?;
    if install_handler() {
        use std::os::unix::thread::JoinHandleExt;
        let thread = closer.as_pthread_t();
        // The closer thread lives as long as the process (its channel's
        // sender is in a static), so `thread` stays valid.
        let _ = std::thread::Builder::new()
            .name("task-fd-closer-watchdog".into())
            .spawn(move || watch(&busy, thread));
    }
    Some(Closer { tx })
}

fn set(busy: &Busy, since: Option<Instant>) {
    *busy.since.lock().unwrap_or_else(|p| p.into_inner()) = since;
    busy.changed.notify_all();
}

/// Interrupts every drop of the closer thread that takes longer than
/// [`STUCK`], again every [`STUCK`] while it lasts.
fn watch(busy: &Busy, thread: libc::pthread_t) {
    let mut since = busy.since.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        match *since {
            None => {
                since = busy.changed.wait(since).unwrap_or_else(|p| p.into_inner());
            }
            Some(at) => {
                let left = STUCK.saturating_sub(at.elapsed());
                if left.is_zero() {
                    // SAFETY: `thread` is the closer thread, which never
                    // ends (see `start`); the signal's handler is installed
                    // and does nothing.
                    unsafe {
                        libc::pthread_kill(thread, interrupt_signal());
                    }
                    *since = Some(Instant::now());
                    continue;
                }
                since = busy
                    .changed
                    .wait_timeout(since, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
    }
}

/// Drops `item` on the closer thread (here, if that thread could not start).
pub(crate) fn dispose<T: Send + 'static>(item: T) {
    match CLOSER.get_or_init(start) {
        Some(closer) => {
            if let Err(back) = closer.tx.send(Box::new(item)) {
                drop(back);
            }
        }
        None => drop(item),
    }
}

/// A value that is dropped on the closer thread.
#[derive(Debug)]
pub(crate) struct Deferred<T: Send + 'static>(Option<T>);

impl<T: Send + 'static> Deferred<T> {
    pub(crate) fn new(value: T) -> Self {
        Self(Some(value))
    }
}

impl<T: Send + 'static> std::ops::Deref for Deferred<T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.0.as_ref().expect("taken only by drop")
    }
}

impl<T: Send + 'static> Drop for Deferred<T> {
    fn drop(&mut self) {
        if let Some(value) = self.0.take() {
            dispose(value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A drop that blocks until interrupted: the closer thread gets the
    /// signal, and the next item is dropped soon after.
    #[test]
    fn a_stuck_drop_is_interrupted_and_the_next_one_goes_through() {
        struct Sleeper;
        impl Drop for Sleeper {
            fn drop(&mut self) {
                // `pause` returns once a handled signal arrives.
                // SAFETY: `pause` has no preconditions.
                unsafe {
                    libc::pause();
                }
            }
        }
        let (tx, rx) = std::sync::mpsc::channel();
        struct Notify(std::sync::mpsc::Sender<()>);
        impl Drop for Notify {
            fn drop(&mut self) {
                let _ = self.0.send(());
            }
        }
        dispose(Sleeper);
        dispose(Notify(tx));
        rx.recv_timeout(STUCK * 20)
            .expect("the drop after a stuck one happens");
    }
}
