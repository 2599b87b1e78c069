//! Fault-injection points for crash tests. With the `fault-injection` feature a test arms a
//! named point; the `n`th time the write path reaches it, the path stops there for good (its
//! future never completes) and [`crashed`] turns true, so the test can drop the volume as a
//! killed gateway would leave it. Without the feature every point is an empty inline function.

#[cfg(feature = "fault-injection")]
mod imp {
    //! Per thread: a test and the volume it drives run on one thread (a current-thread
    //! runtime), so tests running side by side do not see each other's points.

    use std::cell::{Cell, RefCell};

    thread_local! {
        static ARMED: RefCell<Option<(String, usize)>> = const { RefCell::new(None) };
        static CRASHED: Cell<bool> = const { Cell::new(false) };
    }

    /// Stop at the `nth` (1-based) arrival at `point` on this thread.
    pub fn arm(point: &str, nth: usize) {
        ARMED.with(|a| *a.borrow_mut() = Some((point.to_string(), nth)));
        CRASHED.with(|c| c.set(false));
    }

    /// Disarm and clear the crashed flag.
    pub fn disarm() {
        ARMED.with(|a| *a.borrow_mut() = None);
        CRASHED.with(|c| c.set(false));
    }

    /// Whether an armed point was reached.
    pub fn crashed() -> bool {
        CRASHED.with(Cell::get)
    }

    /// A point in the write path.
    pub async fn point(name: &str) {
        let hit = ARMED.with(|a| {
            let mut a = a.borrow_mut();
            match a.as_mut() {
                Some((p, n)) if p == name => {
                    *n -= 1;
                    if *n == 0 {
                        *a = None;
                        true
                    } else {
                        false
                    }
                }
                _ => false,
            }
        });
        if hit {
            CRASHED.with(|c| c.set(true));
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(feature = "fault-injection")]
pub use imp::{arm, crashed, disarm, point};

/// A point in the write path (no-op without the `fault-injection` feature).
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub async fn point(_name: &str) {}
