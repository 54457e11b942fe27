//! tunfwd forwarder processes under test: one per namespace, started from
//! this very binary (`tunfwd tunnel --netns ... --exit-with-parent`), with
//! their CPU time read from /proc and their own counters from the summary.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::report::QueueFigures;
use super::sched::{self, Sched};
use super::topology::{TUN_A, TUN_B, Topology, UNDERLAY_A, UNDERLAY_B};
use crate::error::{Context, Error, Result};

const PORT: u16 = 5000;

/// One forwarder process and its collected output.
struct Forwarder {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

fn collect(r: impl Read + Send + 'static, into: Arc<Mutex<String>>) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut r = BufReader::new(r);
        let mut line = String::new();
        while matches!(r.read_line(&mut line), Ok(n) if n > 0) {
            if let Ok(mut s) = into.lock() {
                s.push_str(&line);
            }
            line.clear();
        }
    })
}

fn text(s: &Arc<Mutex<String>>) -> String {
    s.lock().map(|s| s.clone()).unwrap_or_default()
}

impl Forwarder {
    fn start(args: Vec<String>) -> Result<Forwarder> {
        let exe = std::env::current_exe().context(|| "find the tunfwd executable")?;
        let mut child = Command::new(&exe)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context(|| format!("start forwarder {}", exe.display()))?;
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut readers = Vec::new();
        if let Some(o) = child.stdout.take() {
            readers.push(collect(o, stdout.clone()));
        }
        if let Some(e) = child.stderr.take() {
            readers.push(collect(e, stderr.clone()));
        }
        let mut f = Forwarder {
            child,
            stdout,
            stderr,
            readers,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !text(&f.stderr).contains("tunnel up") {
            if let Ok(Some(status)) = f.child.try_wait() {
                f.join_readers();
                return Err(Error::config(format!(
                    "forwarder exited ({status}) during setup: {}",
                    text(&f.stderr).trim()
                )));
            }
            if Instant::now() > deadline {
                return Err(Error::config(format!(
                    "forwarder not up within 10 s: {}",
                    text(&f.stderr).trim()
                )));
            }
            thread::sleep(Duration::from_millis(10));
        }
        Ok(f)
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn join_readers(&mut self) {
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }

    /// SIGTERM, wait, and return the summary lines ("summary total ...",
    /// then "summary kernel ..." or nothing).
    fn stop(mut self) -> Result<String> {
        let _ = kill(Pid::from_raw(self.pid()), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return Err(Error::config(
                    "forwarder did not stop within 10 s of SIGTERM",
                ));
            }
            thread::sleep(Duration::from_millis(10));
        };
        self.join_readers();
        let out = text(&self.stdout);
        if !status.success() {
            return Err(Error::config(format!(
                "forwarder exited with {status}: {}",
                text(&self.stderr).trim()
            )));
        }
        let total = out
            .lines()
            .find(|l| l.contains("summary total"))
            .ok_or_else(|| Error::config(format!("no summary from forwarder: {out}")))?;
        let kernel = out
            .lines()
            .find(|l| l.contains("summary kernel"))
            .unwrap_or_default();
        Ok(format!("{total}\n{kernel}"))
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What both forwarders reported, added up.
#[derive(Clone, Copy, Debug, Default)]
pub struct PairCounters {
    /// Packets that crossed the tunnel (each is read from a TUN device once).
    pub tunnel_packets: u64,
    pub syscalls: u64,
    /// tunfwd's own drops, all reasons.
    pub drops: u64,
    /// The kernel's drops at the forwarders' UDP sockets (receive buffer
    /// full) and on the way into their TUN devices (queue full).
    pub udp_rcvbuf_drops: u64,
    pub tun_queue_drops: u64,
    /// The queues: longest visit and wait, deepest queue, CoDel's marks and
    /// drops, overload drops (the drops are part of `drops`).
    pub queue: QueueFigures,
}

/// Values of `key=` on a summary line, in order of appearance.
fn fields(line: &str, key: &str) -> Vec<u64> {
    let pat = format!("{key}=");
    line.split(|c: char| c.is_whitespace() || c == '[' || c == ']')
        .filter_map(|t| t.strip_prefix(&pat))
        .filter_map(|v| v.parse().ok())
        .collect()
}

fn counters(line: &str) -> PairCounters {
    // Field order: tun_to_peer packets first, then peer_to_tun.
    PairCounters {
        tunnel_packets: fields(line, "packets").first().copied().unwrap_or(0),
        syscalls: fields(line, "syscalls").first().copied().unwrap_or(0),
        drops: fields(line, "drops").iter().sum(),
        udp_rcvbuf_drops: fields(line, "udp_rcvbuf_drops").iter().sum(),
        tun_queue_drops: fields(line, "tun_queue_drops").iter().sum(),
        queue: QueueFigures {
            visit_max_us: fields(line, "visit_max_us").into_iter().max().unwrap_or(0),
            queue_delay_max_us: fields(line, "queue_delay_max_us")
                .into_iter()
                .max()
                .unwrap_or(0),
            queue_max: fields(line, "queue_max").into_iter().max().unwrap_or(0),
            aqm_marks: fields(line, "aqm_marks").iter().sum(),
            aqm_drops: fields(line, "aqm_drops").iter().sum(),
            overload_drops: fields(line, "overload").iter().sum(),
        },
    }
}

/// `tunfwd reflect` in namespace a: device `tfr0`, 198.19.3.1/24; probes
/// to 198.19.3.2 are answered by it (the TUN path alone, one host).
pub struct Reflector {
    f: Forwarder,
}

/// The name tunfwd's worker threads start with (`tunfwd-qN`, one per
/// queue, both engines): the threads that move packets.
const WORKER: &str = "tunfwd-q";

/// The reflector's device address and the far end probes go to.
pub const REFLECT_ADDR: &str = "198.19.3.1/24";

impl Reflector {
    pub fn start(topo: &Topology, extra: &[String]) -> Result<Reflector> {
        let mut args: Vec<String> = vec![
            "reflect".into(),
            "--netns".into(),
            topo.a.proc_path(),
            "--exit-with-parent".into(),
            "--dev".into(),
            "tfr0".into(),
            "--address".into(),
            REFLECT_ADDR.into(),
        ];
        args.extend(extra.iter().cloned());
        Ok(Reflector {
            f: Forwarder::start(args)?,
        })
    }

    pub fn cpu_seconds(&self) -> f64 {
        process_cpu_seconds(self.f.pid())
    }

    /// The scheduler's figures for its workers.
    pub fn sched(&self) -> Vec<(String, Sched)> {
        vec![("reflect".into(), sched::sample(self.f.pid(), Some(WORKER)))]
    }

    /// Stops it; the reflected packets count as tunnel packets.
    pub fn stop(self) -> Result<PairCounters> {
        let line = self.f.stop()?;
        Ok(PairCounters {
            tunnel_packets: fields(&line, "packets").get(1).copied().unwrap_or(0),
            ..counters(&line)
        })
    }
}

/// Side b's `--cpus` where side a (whose "tunnel up" line is `a_said`)
/// runs several workers pinned by `--cpus auto` (worker k on the k-th CPU):
/// the CPUs in the opposite order, so that the two ends of a flow (worker
/// k of each side, on one host) run on different CPUs, as they would on
/// two hosts, instead of taking turns on one. None where the target gives
/// `--cpus` itself or a runs one queue (unpinned).
fn opposite_cpus(a_said: &str, extra: &[String]) -> Option<String> {
    if extra.iter().any(|a| a == "--cpus") {
        return None;
    }
    let queues: usize = a_said
        .lines()
        .find(|l| l.contains("tunnel up"))?
        .split(", ")
        .find_map(|f| f.strip_suffix(" queue(s)"))?
        .parse()
        .ok()?;
    if queues < 2 {
        return None;
    }
    let mut cpus = crate::platform::allowed_cpus().ok()?;
    cpus.reverse();
    let list: Vec<String> = cpus.iter().map(usize::to_string).collect();
    Some(list.join(","))
}

/// A forwarder in each namespace of `topo`.
pub struct ForwarderPair {
    a: Forwarder,
    b: Forwarder,
}

impl ForwarderPair {
    /// Starts `tunfwd tunnel --engine ENGINE EXTRA...` on both sides and
    /// waits until both report the tunnel up. With `hub`, each side's peers
    /// come from a file of that many: the other side (owning its tunnel
    /// address) and synthetic ones ([`crate::peers::synthetic_hub`], ten
    /// prefixes each, never sent to).
    pub fn start(
        topo: &Topology,
        engine: &str,
        extra: &[String],
        hub: Option<usize>,
        wg: bool,
    ) -> Result<ForwarderPair> {
        let files = match (hub, wg) {
            (Some(n), _) => Some(PeerFiles::hub(n)?),
            (None, true) => Some(PeerFiles::wireguard()?),
            (None, false) => None,
        };
        let args = |ns: String, me, peer, addr, file: Option<&std::path::Path>| {
            let peer_args = match file {
                Some(f) if wg => vec!["--wg-config".into(), f.display().to_string()],
                Some(f) => vec!["--peers-file".into(), f.display().to_string()],
                None => vec!["--peer".into(), format!("{peer}:{PORT}")],
            };
            let mut v: Vec<String> = vec![
                "tunnel".into(),
                "--netns".into(),
                ns,
                "--exit-with-parent".into(),
                "--dev".into(),
                "tun0".into(),
                "--address".into(),
                format!("{addr}/24"),
                "--listen".into(),
                format!("{me}:{PORT}"),
                "--engine".into(),
                engine.into(),
            ];
            v.extend(peer_args);
            v.extend(extra.iter().cloned());
            v
        };
        let (fa, fb) = match &files {
            Some(f) => (Some(f.a.as_path()), Some(f.b.as_path())),
            None => (None, None),
        };
        let a = Forwarder::start(args(topo.a.proc_path(), UNDERLAY_A, UNDERLAY_B, TUN_A, fa))?;
        let mut b_args = args(topo.b.proc_path(), UNDERLAY_B, UNDERLAY_A, TUN_B, fb);
        if let Some(cpus) = opposite_cpus(&text(&a.stderr), extra) {
            b_args.extend(["--cpus".into(), cpus]);
        }
        let b = Forwarder::start(b_args)?;
        // Read at start: not needed any more.
        drop(files);
        if let Some(n) = hub {
            // Each forwarder says what it loaded: the measurement is void
            // unless both carry the whole table.
            let want = format!("-> {n} peers by");
            for f in [&a, &b] {
                let said = text(&f.stderr);
                if !said.contains(&want) {
                    return Err(Error::config(format!(
                        "a +hub={n} forwarder did not load {n} peers: {}",
                        said.trim()
                    )));
                }
            }
        }
        Ok(ForwarderPair { a, b })
    }

    /// User + system CPU seconds both forwarders have used so far.
    pub fn cpu_seconds(&self) -> f64 {
        process_cpu_seconds(self.a.pid()) + process_cpu_seconds(self.b.pid())
    }

    /// The scheduler's figures for each side's workers.
    pub fn sched(&self) -> Vec<(String, Sched)> {
        vec![
            ("a".into(), sched::sample(self.a.pid(), Some(WORKER))),
            ("b".into(), sched::sample(self.b.pid(), Some(WORKER))),
        ]
    }

    /// Stops both and adds up their counters.
    pub fn stop(self) -> Result<PairCounters> {
        let la = self.a.stop()?;
        let lb = self.b.stop()?;
        let (ca, cb) = (counters(&la), counters(&lb));
        Ok(PairCounters {
            tunnel_packets: ca.tunnel_packets + cb.tunnel_packets,
            syscalls: ca.syscalls + cb.syscalls,
            drops: ca.drops + cb.drops,
            udp_rcvbuf_drops: ca.udp_rcvbuf_drops + cb.udp_rcvbuf_drops,
            tun_queue_drops: ca.tun_queue_drops + cb.tun_queue_drops,
            queue: ca.queue.merged(&cb.queue),
        })
    }
}

/// The peers files of a `+hub=N` target, or the WireGuard files of a
/// `+wg` one, removed on drop.
struct PeerFiles {
    dir: std::path::PathBuf,
    a: std::path::PathBuf,
    b: std::path::PathBuf,
}

impl PeerFiles {
    fn new(kind: &str) -> Result<PeerFiles> {
        let dir = std::env::temp_dir().join(format!("tunfwd-bench-{kind}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).context(|| format!("create {}", dir.display()))?;
        Ok(PeerFiles {
            a: dir.join("peers-a"),
            b: dir.join("peers-b"),
            dir,
        })
    }

    /// Each side's `wg setconf` file, with fresh keys, naming the other
    /// side (at its address, owning its tunnel address); only the owner
    /// may read them, as tunfwd demands.
    fn wireguard() -> Result<PeerFiles> {
        let files = PeerFiles::new("wg")?;
        let keys = super::wggo::Keys::new()?;
        for (path, own, peer, at, addr) in [
            (&files.a, &keys.a, &keys.b, UNDERLAY_B, TUN_B),
            (&files.b, &keys.b, &keys.a, UNDERLAY_A, TUN_A),
        ] {
            let text = super::wggo::conf(own, peer, PORT, at, addr);
            super::wggo::write_private(path, &text)?;
        }
        Ok(files)
    }

    /// Side a's file names b (owning b's tunnel address) and n-1
    /// synthetic peers; side b's the same with a.
    fn hub(n: usize) -> Result<PeerFiles> {
        let files = PeerFiles::new("hub")?;
        let synthetic: String = crate::peers::synthetic_hub(n - 1, 10)
            .iter()
            .map(|p| format!("{p}\n"))
            .collect();
        for (path, peer, addr) in [(&files.a, UNDERLAY_B, TUN_B), (&files.b, UNDERLAY_A, TUN_A)] {
            let text = format!("# tunfwd bench: {n} peers\n{peer}:{PORT} {addr}/32\n{synthetic}");
            std::fs::write(path, text).context(|| format!("write {}", path.display()))?;
        }
        Ok(files)
    }
}

impl Drop for PeerFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn clock_ticks_per_second() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map(|t| t as f64)
        .unwrap_or(100.0)
}

/// utime + stime of process `pid` in seconds (0 if it is gone).
pub fn process_cpu_seconds(pid: i32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name in parentheses; utime and stime are the
    // 14th and 15th fields of the whole line.
    let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| f.get(i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    ticks as f64 / clock_ticks_per_second()
}

/// CPU seconds the whole machine spent busy (all CPUs, all processes and
/// the kernel's softirq work), from /proc/stat.
pub fn system_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let Some(line) = stat.lines().next() else {
        return 0.0;
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: u64 = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| v.get(i)).sum();
    busy as f64 / clock_ticks_per_second()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn side_b_pins_opposite_where_a_runs_several_queues() {
        let up = |n: usize| {
            format!("tunnel up: dev tun0 (created), mtu 1420, {n} queue(s), engine uring, x\n")
        };
        let mut want = crate::platform::allowed_cpus().unwrap();
        want.reverse();
        let want: Vec<String> = want.iter().map(usize::to_string).collect();
        assert_eq!(opposite_cpus(&up(2), &[]), Some(want.join(",")));
        // One queue is not pinned; a target's own --cpus stands.
        assert_eq!(opposite_cpus(&up(1), &[]), None);
        let own = ["--cpus".to_string(), "none".to_string()];
        assert_eq!(opposite_cpus(&up(2), &own), None);
        assert_eq!(opposite_cpus("starting", &[]), None);
    }

    #[test]
    fn parses_summary_line() {
        let line = "tunfwd: summary total tun_to_peer packets=10 bytes=840 drops=2 backpressure=0 \
                    [over_mtu=2] | peer_to_tun packets=7 bytes=500 drops=1 backpressure=3 \
                    [not_from_peer=1] | syscalls=40 syscalls_per_packet=2.35 waits=9 io_errors=0\n\
                    tunfwd: summary kernel udp_rcvbuf_drops=5 tun_queue_drops=6";
        let c = counters(line);
        assert_eq!(c.tunnel_packets, 10);
        assert_eq!(c.syscalls, 40);
        assert_eq!(c.drops, 3);
        assert_eq!((c.udp_rcvbuf_drops, c.tun_queue_drops), (5, 6));
    }

    #[test]
    fn own_cpu_time_is_readable() {
        // Spend 50 ms of CPU (as getrusage counts it, in microseconds),
        // then /proc's tick-based count must show at least 40 ms of it.
        use nix::sys::resource::{UsageWho, getrusage};
        let used = || {
            let u = getrusage(UsageWho::RUSAGE_SELF).unwrap();
            let us = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
            us(u.user_time()) + us(u.system_time())
        };
        let start = used();
        let mut x = 0u64;
        while used() - start < 0.05 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        let t = process_cpu_seconds(std::process::id() as i32);
        assert!(t >= 0.04, "{t} s of CPU after spending 50 ms");
        assert!(system_cpu_seconds() > 0.0);
        assert_eq!(process_cpu_seconds(-1), 0.0);
    }
}
