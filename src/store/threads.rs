//! The store's own threads (background, checkpoint, compaction, key filter, unmapping):
//! started with a lower CPU priority than the application's, as `Options::background_nice`
//! says, so that on a machine with few cores they take the CPU the writer leaves free
//! instead of preempting it.

#![allow(unsafe_code)]

use std::thread::JoinHandle;

/// The nice value `steps` below this thread's (capped at 19), or `None` for 0 steps.
/// Taken once, on the thread that opens the store: threads the store's own threads start
/// (a compaction starting a checkpoint) get the same value, not one lower again.
pub(super) fn nice_below_this_thread(steps: i32) -> Option<i32> {
    (steps > 0).then(|| current_nice().saturating_add(steps).min(19))
}

/// Starts `f` on a thread named `name`, at nice value `nice` if given (see
/// [`nice_below_this_thread`]). A priority that cannot be set is left as it is.
pub(super) fn spawn<T: Send + 'static>(
    name: &str,
    nice: Option<i32>,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<JoinHandle<T>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            STORE_THREAD.set(true);
            if let Some(n) = nice {
                set_nice(n);
            }
            f()
        })
}

std::thread_local! {
    /// Set on the threads [`spawn`] starts.
    static STORE_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// True on one of the store's own threads (started by [`spawn`]), false on the
/// application's.
pub(super) fn on_store_thread() -> bool {
    STORE_THREAD.get()
}

/// This thread's nice value (0 if it cannot be read).
fn current_nice() -> i32 {
    // SAFETY: getpriority only reads the calling thread's (who = 0) scheduling
    // priority; errno is cleared first because -1 is a valid result.
    unsafe {
        *libc::__errno_location() = 0;
        let n = libc::getpriority(libc::PRIO_PROCESS, 0);
        if n == -1 && *libc::__errno_location() != 0 {
            0
        } else {
            n
        }
    }
}

/// Sets this thread's nice value (best effort: raising it needs no privilege, lowering
/// it does).
fn set_nice(n: i32) {
    // SAFETY: setpriority with who = 0 changes only the calling thread's nice value on
    // Linux; it touches no memory of ours.
    let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, n) };
}
