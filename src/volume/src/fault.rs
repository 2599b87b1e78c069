//! Fault-injection points for crash and abort tests. With the `fault-injection` feature a test
//! arms a named point; the `n`th time the write path reaches it, the path stops there: for good
//! ([`arm`]: its future never completes and [`crashed`] turns true, so the test can drop the
//! volume as a killed gateway would leave it), or until the test lets it go on ([`arm_pause`],
//! [`paused`], [`release`]: the test aborts the command meanwhile, as ABORT TASK would).
//! Without the feature every point is an empty inline function.

#[cfg(feature = "fault-injection")]
mod imp {
    //! Per thread: a test and the volume it drives run on one thread (a current-thread
    //! runtime), so tests running side by side do not see each other's points.

    use std::cell::{Cell, RefCell};

    thread_local! {
        static ARMED: RefCell<Option<(String, usize, bool)>> = const { RefCell::new(None) };
        static CRASHED: Cell<bool> = const { Cell::new(false) };
        static PAUSED: Cell<bool> = const { Cell::new(false) };
        static RELEASED: Cell<bool> = const { Cell::new(false) };
    }

    fn reset(armed: Option<(String, usize, bool)>) {
        ARMED.with(|a| *a.borrow_mut() = armed);
        CRASHED.with(|c| c.set(false));
        PAUSED.with(|c| c.set(false));
        RELEASED.with(|c| c.set(false));
    }

    /// Stop for good at the `nth` (1-based) arrival at `point` on this thread.
    pub fn arm(point: &str, nth: usize) {
        reset(Some((point.to_string(), nth, false)));
    }

    /// Pause at the `nth` (1-based) arrival at `point` on this thread until [`release`].
    pub fn arm_pause(point: &str, nth: usize) {
        reset(Some((point.to_string(), nth, true)));
    }

    /// Disarm and clear the crashed and paused flags (a paused path goes on).
    pub fn disarm() {
        reset(None);
        RELEASED.with(|c| c.set(true));
    }

    /// Whether an armed point was reached (and the path stopped for good).
    pub fn crashed() -> bool {
        CRASHED.with(Cell::get)
    }

    /// Whether a path waits at a point armed with [`arm_pause`].
    pub fn paused() -> bool {
        PAUSED.with(Cell::get) && !RELEASED.with(Cell::get)
    }

    /// Let the paused path go on.
    pub fn release() {
        RELEASED.with(|c| c.set(true));
    }

    /// A point in the write path.
    pub async fn point(name: &str) {
        let hit = ARMED.with(|a| {
            let mut a = a.borrow_mut();
            match a.as_mut() {
                Some((p, n, pause)) if p == name => {
                    *n -= 1;
                    if *n == 0 {
                        let pause = *pause;
                        *a = None;
                        Some(pause)
                    } else {
                        None
                    }
                }
                _ => None,
            }
        });
        match hit {
            Some(false) => {
                CRASHED.with(|c| c.set(true));
                std::future::pending::<()>().await;
            }
            Some(true) => {
                PAUSED.with(|c| c.set(true));
                while !RELEASED.with(Cell::get) {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            }
            None => {}
        }
    }
}

#[cfg(feature = "fault-injection")]
pub use imp::{arm, arm_pause, crashed, disarm, paused, point, release};

/// A point in the write path (no-op without the `fault-injection` feature).
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub async fn point(_name: &str) {}
