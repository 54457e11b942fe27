//! How the scheduler treated the forwarders during a workload: time on a
//! CPU, time runnable but waiting for one (run-queue delay), how often they
//! were put on a CPU, and their context switches, from
//! `/proc/PID/task/TID/{schedstat,status,comm}` (the kernel's `sched_info`,
//! there whenever `CONFIG_SCHED_INFO` is, without schedstats switched on).

use std::path::Path;

/// Sums over the threads of one process (or of the threads whose name
/// starts with a prefix: tunfwd's workers are `tunfwd-qN`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sched {
    /// Threads counted.
    pub threads: u64,
    /// Nanoseconds on a CPU.
    pub run_ns: u64,
    /// Nanoseconds runnable but waiting on a run queue: a woken thread's
    /// wait for a CPU, and a preempted thread's wait to get it back.
    pub wait_ns: u64,
    /// Times put on a CPU (each run after a wakeup or a preemption).
    pub runs: u64,
    /// Switches away because the thread blocked (each is followed by a
    /// wakeup).
    pub voluntary: u64,
    /// Switches away because something else was given the CPU.
    pub involuntary: u64,
}

impl Sched {
    /// What happened between `before` and `self` (threads as now).
    pub fn since(&self, before: &Sched) -> Sched {
        Sched {
            threads: self.threads,
            run_ns: self.run_ns.saturating_sub(before.run_ns),
            wait_ns: self.wait_ns.saturating_sub(before.wait_ns),
            runs: self.runs.saturating_sub(before.runs),
            voluntary: self.voluntary.saturating_sub(before.voluntary),
            involuntary: self.involuntary.saturating_sub(before.involuntary),
        }
    }

    /// Both summed.
    pub fn plus(&self, o: &Sched) -> Sched {
        Sched {
            threads: self.threads + o.threads,
            run_ns: self.run_ns + o.run_ns,
            wait_ns: self.wait_ns + o.wait_ns,
            runs: self.runs + o.runs,
            voluntary: self.voluntary + o.voluntary,
            involuntary: self.involuntary + o.involuntary,
        }
    }

    /// Mean run-queue delay per run, in microseconds.
    pub fn wait_per_run_us(&self) -> Option<f64> {
        (self.runs > 0).then(|| self.wait_ns as f64 / self.runs as f64 / 1e3)
    }

    /// Context switches of both kinds.
    pub fn switches(&self) -> u64 {
        self.voluntary + self.involuntary
    }
}

/// The scheduler's figures for process `pid`: its threads whose name
/// starts with `prefix` (all of them when `None`). A process or thread that
/// is gone counts nothing.
pub fn sample(pid: i32, prefix: Option<&str>) -> Sched {
    sample_in(Path::new(&format!("/proc/{pid}/task")), prefix)
}

fn sample_in(tasks: &Path, prefix: Option<&str>) -> Sched {
    let mut s = Sched::default();
    let Ok(dir) = std::fs::read_dir(tasks) else {
        return s;
    };
    for t in dir.flatten() {
        let p = t.path();
        if let Some(prefix) = prefix {
            let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
            if !comm.trim_end().starts_with(prefix) {
                continue;
            }
        }
        let (Ok(stat), Ok(status)) = (
            std::fs::read_to_string(p.join("schedstat")),
            std::fs::read_to_string(p.join("status")),
        ) else {
            continue;
        };
        let Some(one) = parse(&stat, &status) else {
            continue;
        };
        s = s.plus(&one);
    }
    s
}

/// One thread's figures from its `schedstat` ("run_ns wait_ns runs") and
/// `status` (the `*_ctxt_switches` lines).
fn parse(schedstat: &str, status: &str) -> Option<Sched> {
    let mut f = schedstat.split_whitespace().map(|v| v.parse::<u64>().ok());
    let (run_ns, wait_ns, runs) = (f.next()??, f.next()??, f.next()??);
    let switches = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    Some(Sched {
        threads: 1,
        run_ns,
        wait_ns,
        runs,
        voluntary: switches("voluntary_ctxt_switches:")?,
        involuntary: switches("nonvoluntary_ctxt_switches:")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_one_thread() {
        let status =
            "Name:\ttunfwd-q0\nvoluntary_ctxt_switches:\t12\nnonvoluntary_ctxt_switches:\t3\n";
        let s = parse("5000 2000 15\n", status).unwrap();
        assert_eq!(
            s,
            Sched {
                threads: 1,
                run_ns: 5000,
                wait_ns: 2000,
                runs: 15,
                voluntary: 12,
                involuntary: 3
            }
        );
        assert_eq!(s.wait_per_run_us(), Some(2000.0 / 15.0 / 1e3));
        assert!(parse("5000 x 15", status).is_none());
        assert!(parse("5000 2000 15", "Name:\tx\n").is_none());
        assert_eq!(Sched::default().wait_per_run_us(), None);
    }

    #[test]
    fn counts_this_process_and_only_named_threads() {
        let pid = std::process::id() as i32;
        // A thread that blocks and wakes a few times, under a name of its own.
        let named = std::thread::Builder::new()
            .name("sched-probe".into())
            .spawn(|| {
                for _ in 0..20 {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                sample(std::process::id() as i32, Some("sched-probe"))
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(named.threads, 1, "{named:?}");
        assert!(
            named.voluntary >= 20,
            "20 sleeps are 20 switches: {named:?}"
        );
        assert!(named.runs >= named.voluntary, "{named:?}");
        let all = sample(pid, None);
        assert!(all.threads >= 1 && all.run_ns > 0, "{all:?}");
        assert_eq!(sample(pid, Some("no-such-thread")), Sched::default());
        assert_eq!(sample(-1, None), Sched::default());
        let later = all.plus(&named);
        assert_eq!(later.since(&all).voluntary, named.voluntary);
        assert_eq!(all.since(&later).runs, 0, "never negative");
    }
}
