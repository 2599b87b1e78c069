//! systemd integration (`Type=notify`, sd_notify(3)): readiness, stopping, and a watchdog fed
//! by the daemon's own health check. Without `NOTIFY_SOCKET` (not started by systemd) every
//! call is a no-op.
//!
//! The health check is liveness of the event loops that do the work: each loop (every
//! gateway worker, the maintenance loop, the node's loop) holds a [`Beat`] and beats it from
//! a task of its own at least every [`BEAT_EVERY`]. A loop that stops turning (blocked on a
//! lost disk, a deadlock, a spin) stops beating; the watchdog thread then stops pinging, and
//! systemd restarts the daemon after `WatchdogSec`. A timer that pinged regardless would hide
//! exactly the failures the watchdog exists for.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tracing::{debug, warn};

/// How often a loop beats.
pub const BEAT_EVERY: Duration = Duration::from_millis(500);
/// A loop silent this long is unhealthy.
pub const SILENT_AFTER: Duration = Duration::from_secs(5);

/// Tell systemd the daemon is ready (after its listeners are bound).
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Tell systemd the daemon is reloading its configuration (READY=1 follows when done).
pub fn reloading() {
    send(&[NotifyState::Reloading, NotifyState::Status("reloading")]);
}

/// Tell systemd the daemon is stopping.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

fn send(state: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, state) {
        debug!("sd_notify: {e}");
    }
}

/// The watchdog interval systemd asked for (`WATCHDOG_USEC`), if any: for this process
/// unless `WATCHDOG_PID` names another (sd_watchdog_enabled(3)).
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// The loops a daemon's health depends on.
#[derive(Debug, Default, Clone)]
pub struct Heartbeats {
    beats: Arc<Mutex<Vec<Beat>>>,
    t0: Arc<OnceInstant>,
}

#[derive(Debug, Default)]
struct OnceInstant(std::sync::OnceLock<Instant>);

impl OnceInstant {
    fn get(&self) -> Instant {
        *self.0.get_or_init(Instant::now)
    }
}

/// One loop's heartbeat.
#[derive(Debug, Clone)]
pub struct Beat {
    name: Arc<str>,
    /// Milliseconds since the registry's start at the last beat.
    last: Arc<AtomicU64>,
    t0: Arc<OnceInstant>,
}

impl Beat {
    /// The loop is alive.
    pub fn beat(&self) {
        let ms = self.t0.get().elapsed().as_millis() as u64;
        self.last.store(ms, Ordering::Relaxed);
    }

    /// Beat every [`BEAT_EVERY`] from a task on the calling thread's event loop, for as long
    /// as the loop runs it.
    pub fn spawn_local(self) {
        tokio::task::spawn_local(async move {
            loop {
                self.beat();
                tokio::time::sleep(BEAT_EVERY).await;
            }
        });
    }
}

impl Heartbeats {
    /// A new loop to watch, alive now.
    pub fn register(&self, name: &str) -> Beat {
        let b = Beat {
            name: name.into(),
            last: Arc::new(AtomicU64::new(0)),
            t0: self.t0.clone(),
        };
        b.beat();
        self.beats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(b.clone());
        b
    }

    /// `Ok` when every loop beat within `silent`; otherwise the silent ones.
    pub fn check(&self, silent: Duration) -> Result<(), String> {
        let now = self.t0.get().elapsed().as_millis() as u64;
        let limit = silent.as_millis() as u64;
        let quiet: Vec<String> = self
            .beats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|b| {
                let since = now.saturating_sub(b.last.load(Ordering::Relaxed));
                (since > limit)
                    .then(|| format!("{} silent for {:.1} s", b.name, since as f64 / 1000.0))
            })
            .collect();
        if quiet.is_empty() {
            Ok(())
        } else {
            Err(quiet.join(", "))
        }
    }

    /// If systemd runs a watchdog for this service, ping it from a thread of its own every
    /// half interval while [`Heartbeats::check`] passes; stop pinging (and say why, once)
    /// when it does not.
    pub fn start_watchdog(&self) {
        let Some(every) = watchdog_interval() else {
            return;
        };
        let hb = self.clone();
        let r = std::thread::Builder::new()
            .name("tessera-watchdog".into())
            .spawn(move || {
                let mut failing = false;
                loop {
                    match hb.check(SILENT_AFTER) {
                        Ok(()) => {
                            if failing {
                                warn!("health check passes again: watchdog pings resume");
                                failing = false;
                            }
                            send(&[NotifyState::Watchdog]);
                        }
                        Err(why) => {
                            if !failing {
                                warn!("health check failed ({why}): no watchdog ping, systemd will restart the daemon");
                                failing = true;
                            }
                        }
                    }
                    std::thread::sleep(every / 2);
                }
            });
        if let Err(e) = r {
            warn!("cannot start the watchdog thread: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_that_stops_beating_fails_the_check_and_one_that_beats_passes() {
        let hb = Heartbeats::default();
        let a = hb.register("worker 0");
        let _b = hb.register("maintenance");
        assert_eq!(hb.check(Duration::from_millis(200)), Ok(()));
        std::thread::sleep(Duration::from_millis(300));
        a.beat();
        let err = hb.check(Duration::from_millis(200)).unwrap_err();
        assert!(err.contains("maintenance silent"), "{err}");
        assert!(!err.contains("worker 0"), "{err}");
    }

    #[test]
    fn a_beat_spawned_on_a_running_loop_keeps_the_check_passing() {
        let hb = Heartbeats::default();
        let b = hb.register("loop");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        tokio::task::LocalSet::new().block_on(&rt, async {
            b.spawn_local();
            tokio::time::sleep(BEAT_EVERY * 3).await;
            assert_eq!(hb.check(BEAT_EVERY * 2), Ok(()));
        });
        // The loop has stopped: silence follows.
        std::thread::sleep(BEAT_EVERY * 3);
        assert!(hb.check(BEAT_EVERY * 2).is_err());
    }

    #[test]
    fn without_systemd_notifications_are_no_ops() {
        // Tests do not run under systemd with Type=notify.
        std::env::remove_var("NOTIFY_SOCKET");
        std::env::remove_var("WATCHDOG_USEC");
        ready("test");
        stopping();
        assert_eq!(watchdog_interval(), None);
    }
}
