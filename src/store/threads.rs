//! The store's own threads (background, checkpoint, compaction, key filter, unmapping):
//! started with a lower CPU priority than the application's, as `Options::background_nice`
//! says, so that on a machine with few cores they take the CPU the writer leaves free
//! instead of preempting it.

#![allow(unsafe_code)]

use std::thread::JoinHandle;

/// Starts `f` on a thread named `name`, `nice` steps below the priority of the thread
/// that starts it (Linux keeps a nice value per thread; capped at 19). A priority that
/// cannot be lowered is left as it is.
pub(super) fn spawn<T: Send + 'static>(
    name: &str,
    nice: i32,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<JoinHandle<T>> {
    let base = current_nice();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            if nice > 0 {
                set_nice(base.saturating_add(nice).min(19));
            }
            f()
        })
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

/// Sets this thread's nice value (best effort: raising it needs no privilege).
fn set_nice(n: i32) {
    // SAFETY: setpriority with who = 0 changes only the calling thread's nice value on
    // Linux; it touches no memory of ours.
    let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, n) };
}
