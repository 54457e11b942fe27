//! How a worker sleeps, the same for both engines: [`Linger`] keeps it
//! looking for packets for a while after some (`--spin`), and
//! [`WakeBoost`] gives it priority on wakeup, with a budget (`--wake-nice`,
//! `--wake-budget`): a worker goes to sleep at a raised priority, so
//! when a packet wakes it the scheduler runs it ahead of bulk applications
//! (on a kernel without preemption, at the next switch); once it has moved
//! its budget of packets since it woke, it drops back to its normal
//! priority, so under sustained load the applications batch again. NAPI
//! works the same way in the kernel: softirq first, with a budget, then
//! ksoftirqd at normal priority.
//!
//! The decisions are pure ([`Linger::keep_looking`], [`WakeBoost::on_wait`],
//! [`WakeBoost::on_pass`]); the engine yields or sleeps, and applies a
//! [`Change`] with [`WakeBoost::apply`].

use std::sync::atomic::{AtomicBool, Ordering};

use crate::stats::WorkerStats;

/// What to do with the thread's priority.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Keep,
    /// Raise it to the wake value.
    Raise(i32),
    /// Drop back to the normal value.
    Lower(i32),
}

/// One worker's wakeup priority state.
#[derive(Debug)]
pub struct WakeBoost {
    /// The nice value to sleep at (None: off).
    wake: Option<i32>,
    /// The thread's own nice value, to drop back to.
    normal: i32,
    budget: u64,
    raised: bool,
    /// Packets moved when the worker last went to sleep raised.
    at_wait: u64,
}

impl WakeBoost {
    /// `wake`: the nice value to sleep at (None or not below `normal`:
    /// off); `budget`: packets after a wakeup before dropping back.
    pub fn new(wake: Option<i32>, normal: i32, budget: u64) -> WakeBoost {
        WakeBoost {
            wake: wake.filter(|&w| w < normal),
            normal,
            budget: budget.max(1),
            raised: false,
            at_wait: 0,
        }
    }

    /// For the calling worker thread: `wake` as `WorkerParts::wake` gives
    /// it, the thread's present nice value as its normal one.
    pub fn for_this_thread(wake: Option<(i32, u64)>) -> WakeBoost {
        let normal = crate::sys::thread_nice().unwrap_or(0);
        let (w, budget) = match wake {
            Some((w, b)) => (Some(w), b),
            None => (None, 1),
        };
        WakeBoost::new(w, normal, budget)
    }

    /// Off: no wake value, or it could not be set.
    pub fn is_off(&self) -> bool {
        self.wake.is_none()
    }

    /// The worker is about to sleep, having moved `moved` packets in all.
    pub fn on_wait(&mut self, moved: u64) -> Change {
        let Some(w) = self.wake else {
            return Change::Keep;
        };
        self.at_wait = moved;
        if self.raised {
            Change::Keep
        } else {
            self.raised = true;
            Change::Raise(w)
        }
    }

    /// The worker finished a pass and has moved `moved` packets in all.
    pub fn on_pass(&mut self, moved: u64) -> Change {
        if self.raised && moved.wrapping_sub(self.at_wait) >= self.budget {
            self.raised = false;
            Change::Lower(self.normal)
        } else {
            Change::Keep
        }
    }

    /// Applies `c` to the calling thread. A raise the thread may not make
    /// turns the boost off, with one log line for the process (naming
    /// `label`, the first worker refused: the others are refused alike); a
    /// lowering is counted in `stats.wake_lowered`.
    pub fn apply(&mut self, c: Change, label: &str, stats: &WorkerStats) {
        match c {
            Change::Keep => {}
            Change::Raise(w) => {
                if let Err(e) = crate::sys::set_thread_nice(w) {
                    static SAID: AtomicBool = AtomicBool::new(false);
                    if !SAID.swap(true, Ordering::Relaxed) {
                        crate::info!(
                            "{label}: --wake-nice {w}: cannot raise the worker's priority ({e}; \
                             needs CAP_SYS_NICE, or an RLIMIT_NICE of {} or more): the workers \
                             run at their normal priority",
                            20 - w
                        );
                    }
                    self.wake = None;
                    self.raised = false;
                }
            }
            Change::Lower(n) => {
                // Lowering one's own priority is always allowed.
                if crate::sys::set_thread_nice(n).is_ok() {
                    stats.wake_lowered.add(1);
                }
            }
        }
    }
}

/// `--spin`: after moving packets, a worker keeps looking for more for a
/// window instead of sleeping, yielding the CPU between looks (so a woken
/// application still runs at once on a kernel without preemption). A
/// request and its answer often cross the forwarder within a few hundred
/// microseconds: the answer then finds the worker awake, and its CPU has
/// not gone idle (waking an idle CPU, in a virtual machine a halted one,
/// is most of a quiet tunnel's latency). With no packets, it sleeps.
#[derive(Debug)]
pub struct Linger {
    window: std::time::Duration,
    /// Packets moved in all at the last look that found some.
    moved: u64,
    /// When the window after the last packets ends.
    until: Option<std::time::Instant>,
}

impl Linger {
    /// A window of `window` after each pass that moved packets (zero: off).
    pub fn new(window: std::time::Duration) -> Linger {
        Linger {
            window,
            moved: 0,
            until: None,
        }
    }

    /// The worker would sleep at `now`, having moved `moved` packets in
    /// all: true if it should look again instead (and yield first).
    pub fn keep_looking(&mut self, now: std::time::Instant, moved: u64) -> bool {
        if self.window.is_zero() {
            return false;
        }
        if moved != self.moved {
            self.moved = moved;
            self.until = Some(now + self.window);
        }
        match self.until {
            Some(until) if now < until => true,
            _ => {
                self.until = None;
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lingers_for_the_window_after_packets_then_sleeps() {
        use std::time::{Duration, Instant};
        let t0 = Instant::now();
        let us = |n| t0 + Duration::from_micros(n);
        let mut l = Linger::new(Duration::from_micros(200));
        assert!(!l.keep_looking(us(0), 0), "no packets yet: sleep");
        assert!(l.keep_looking(us(10), 5), "packets: look again");
        assert!(l.keep_looking(us(150), 5), "within the window");
        assert!(l.keep_looking(us(200), 6), "more packets: a new window");
        assert!(l.keep_looking(us(399), 6));
        assert!(!l.keep_looking(us(400), 6), "window over: sleep");
        assert!(!l.keep_looking(us(5000), 6), "still nothing: sleep");
        let mut off = Linger::new(Duration::ZERO);
        assert!(!off.keep_looking(us(0), 1), "off");
    }

    #[test]
    fn raised_to_sleep_lowered_after_the_budget() {
        let mut b = WakeBoost::new(Some(-10), 0, 64);
        assert_eq!(b.on_pass(0), Change::Keep, "not raised yet");
        assert_eq!(b.on_wait(100), Change::Raise(-10));
        assert_eq!(b.on_wait(100), Change::Keep, "already raised");
        assert_eq!(b.on_pass(163), Change::Keep, "63 of 64");
        assert_eq!(b.on_pass(164), Change::Lower(0));
        assert_eq!(b.on_pass(1000), Change::Keep, "already lowered");
        // A short wakeup (a ping) never uses up the budget: it stays raised.
        assert_eq!(b.on_wait(1000), Change::Raise(-10));
        assert_eq!(b.on_pass(1002), Change::Keep);
        assert_eq!(b.on_wait(1002), Change::Keep);
        assert_eq!(b.on_pass(1003), Change::Keep);
    }

    #[test]
    fn off_unless_the_wake_value_is_higher_priority() {
        for (wake, normal) in [(None, 0), (Some(0), 0), (Some(5), 0), (Some(-5), -5)] {
            let mut b = WakeBoost::new(wake, normal, 8);
            assert!(b.is_off(), "{wake:?} {normal}");
            assert_eq!(b.on_wait(0), Change::Keep);
            assert_eq!(b.on_pass(100), Change::Keep);
        }
        let mut b = WakeBoost::new(Some(-5), 5, 0);
        assert_eq!(b.on_wait(0), Change::Raise(-5));
        assert_eq!(b.on_pass(1), Change::Lower(5), "a budget of 0 acts as 1");
    }

    #[test]
    fn applied_to_this_thread() {
        // A thread of its own, so the test runner's threads keep their
        // priority; lowering (a higher nice) needs no privilege.
        std::thread::spawn(|| {
            let stats = WorkerStats::default();
            let normal = crate::sys::thread_nice().unwrap();
            let mut b = WakeBoost::new(Some(normal), normal + 3, 1);
            // Raising from normal+3 back to normal is refused without
            // privilege and allowed with it: either way nothing panics and
            // a refusal turns the boost off.
            crate::sys::set_thread_nice(normal + 3).unwrap();
            let c = b.on_wait(0);
            b.apply(c, "test", &stats);
            let now = crate::sys::thread_nice().unwrap();
            assert!(now == normal || b.is_off(), "{now} {b:?}");
            if !b.is_off() {
                let c = b.on_pass(1);
                b.apply(c, "test", &stats);
                assert_eq!(crate::sys::thread_nice().unwrap(), normal + 3);
                assert_eq!(stats.wake_lowered.get(), 1);
            }
        })
        .join()
        .unwrap();
    }
}
