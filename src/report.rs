//! What a running tunnel reports, and where it reads it: `Sources` (every
//! worker's counters, the peer table, the kernel's drop counters) is shared
//! by the periodic stats lines, the summary (`Reporter`, text or JSON)
//! and the Prometheus server ([`crate::metrics`]). Reading never blocks a
//! worker.

use std::io::Write;
use std::net::UdpSocket;
use std::sync::Arc;
use std::time::Instant;

use crate::config::StatsFormat;
use crate::peers::{PeerSnapshot, SharedPeers};
use crate::stats::{WorkerSnapshot, WorkerStats};

/// What the reports read: every worker's counters, the peer table, and
/// the kernel's drop counters (as the increase since start).
pub(crate) struct Sources {
    pub workers: Vec<Arc<WorkerStats>>,
    pub peers: Arc<SharedPeers>,
    pub dev: String,
    pub engine: &'static str,
    pub started: Instant,
    kernel: KernelBase,
}

/// Where the kernel's drop counters are read, and their values at start.
pub(crate) struct KernelBase {
    inodes: Vec<u64>,
    udp: u64,
    tun: u64,
}

impl KernelBase {
    /// Reads the counters of `sockets` and of device `dev` now.
    pub fn read(sockets: &[UdpSocket], dev: &str) -> KernelBase {
        let inodes: Vec<u64> = sockets
            .iter()
            .filter_map(crate::platform::socket_inode)
            .collect();
        KernelBase {
            udp: crate::platform::udp_socket_drops(&inodes).unwrap_or(0),
            tun: crate::platform::device_tx_drops(dev).unwrap_or(0),
            inodes,
        }
    }
}

/// The kernel's drops since start: at tunfwd's UDP sockets (receive buffer
/// full) and into its TUN device (queue full); None where unreadable.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct KernelDrops {
    pub udp_rcvbuf: Option<u64>,
    pub tun_queue: Option<u64>,
}

impl KernelDrops {
    fn text(&self) -> String {
        let udp = self.udp_rcvbuf.map(|d| format!(" udp_rcvbuf_drops={d}"));
        let tun = self.tun_queue.map(|d| format!(" tun_queue_drops={d}"));
        format!("{}{}", udp.unwrap_or_default(), tun.unwrap_or_default())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "udp_rcvbuf_drops": self.udp_rcvbuf,
            "tun_queue_drops": self.tun_queue,
        })
    }
}

impl Sources {
    /// Sources for the workers with these counters, on device `dev`, from
    /// now on; the kernel's drops count from `kernel`.
    pub fn new(
        workers: Vec<Arc<WorkerStats>>,
        peers: Arc<SharedPeers>,
        dev: &str,
        engine: &'static str,
        kernel: KernelBase,
    ) -> Sources {
        Sources {
            workers,
            peers,
            dev: dev.to_string(),
            engine,
            started: Instant::now(),
            kernel,
        }
    }

    pub fn snapshots(&self) -> Vec<WorkerSnapshot> {
        self.workers.iter().map(|s| s.snapshot()).collect()
    }

    pub fn kernel_drops(&self) -> KernelDrops {
        KernelDrops {
            udp_rcvbuf: crate::platform::udp_socket_drops(&self.kernel.inodes)
                .map(|d| d.saturating_sub(self.kernel.udp)),
            tun_queue: crate::platform::device_tx_drops(&self.dev)
                .map(|d| d.saturating_sub(self.kernel.tun)),
        }
    }
}

/// Now, in ns since the Unix epoch (the clock of a peer's last receive).
fn unix_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// A table's size (peers, prefixes) and its busiest peers.
type TopPeers = (usize, usize, Vec<(String, PeerSnapshot)>);

/// The `n` peers with the most traffic, with the table's size (None for a
/// point-to-point table).
fn top_peers(shared: &SharedPeers, n: usize) -> Option<TopPeers> {
    let (_, table) = shared.load();
    (!table.is_single()).then(|| (table.len(), table.prefixes(), table.top(n, unix_now_ns())))
}

/// Writes one line to stdout, ignoring a closed stdout (never panics).
fn out(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

/// The periodic stats lines and the summary, in the configured format.
pub(crate) struct Reporter {
    sources: Arc<Sources>,
    format: StatsFormat,
    /// Peers shown per report (the busiest).
    peers_shown: usize,
    last: WorkerSnapshot,
    last_at: Instant,
}

impl Reporter {
    pub fn new(sources: Arc<Sources>, format: StatsFormat, peers_shown: usize) -> Reporter {
        let last_at = sources.started;
        Reporter {
            sources,
            format,
            peers_shown,
            last: WorkerSnapshot::default(),
            last_at,
        }
    }

    /// One stats report: rates since the previous one, totals, per queue,
    /// the kernel's drops and the busiest peers.
    pub fn tick(&mut self) {
        let now = Instant::now();
        let snaps = self.sources.snapshots();
        let total = WorkerSnapshot::sum(&snaps);
        let secs = now.duration_since(self.last_at).as_secs_f64().max(1e-9);
        let pps = (total.packets() - self.last.packets()) as f64 / secs;
        let bytes = (total.tun_to_peer.bytes + total.peer_to_tun.bytes)
            - (self.last.tun_to_peer.bytes + self.last.peer_to_tun.bytes);
        let t = now.duration_since(self.sources.started).as_secs_f64();
        let mbps = bytes as f64 * 8.0 / secs / 1e6;
        let kd = self.sources.kernel_drops();
        match self.format {
            StatsFormat::Text => {
                out(format_args!(
                    "tunfwd: stats t={t:.1}s rate_pps={pps:.0} rate_mbps={mbps:.1} total {total}{}",
                    kd.text(),
                ));
                self.print_parts("stats", &snaps);
            }
            StatsFormat::Json => {
                let mut v = self.json_parts(&total, &snaps, kd);
                v["event"] = "stats".into();
                v["t"] = t.into();
                v["rate_pps"] = pps.into();
                v["rate_mbps"] = mbps.into();
                out(format_args!("{v}"));
            }
        }
        self.last = total;
        self.last_at = now;
    }

    /// The summary at exit; `kd` was read while the workers still owned
    /// their sockets.
    pub fn summary(&self, queues: usize, kd: KernelDrops) {
        let snaps = self.sources.snapshots();
        let total = WorkerSnapshot::sum(&snaps);
        let elapsed = self.sources.started.elapsed().as_secs_f64();
        let (dev, engine) = (&self.sources.dev, self.sources.engine);
        match self.format {
            StatsFormat::Text => {
                out(format_args!(
                    "tunfwd: summary dev={dev} engine={engine} queues={queues} elapsed_s={elapsed:.2}"
                ));
                out(format_args!("tunfwd: summary total {total}"));
                let kd = kd.text();
                if !kd.is_empty() {
                    out(format_args!("tunfwd: summary kernel{kd}"));
                }
                self.print_parts("summary", &snaps);
            }
            StatsFormat::Json => {
                let mut v = self.json_parts(&total, &snaps, kd);
                v["event"] = "summary".into();
                v["dev"] = dev.as_str().into();
                v["engine"] = engine.into();
                v["queues"] = queues.into();
                v["elapsed_s"] = elapsed.into();
                out(format_args!("{v}"));
            }
        }
    }

    /// Text: the per-queue lines (with several queues) and the peers.
    fn print_parts(&self, prefix: &str, snaps: &[WorkerSnapshot]) {
        if snaps.len() > 1 {
            for (q, s) in snaps.iter().enumerate() {
                out(format_args!("tunfwd: {prefix} queue={q} {s}"));
            }
        }
        let Some((count, prefixes, top)) = top_peers(&self.sources.peers, self.peers_shown) else {
            return;
        };
        let now = unix_now_ns();
        out(format_args!(
            "tunfwd: {prefix} peers={count} prefixes={prefixes} shown={}",
            top.len()
        ));
        for (addr, s) in top {
            out(format_args!(
                "tunfwd: {prefix} peer={addr} {}",
                s.fields(now)
            ));
        }
    }

    /// JSON: what stats and summary objects share.
    fn json_parts(
        &self,
        total: &WorkerSnapshot,
        snaps: &[WorkerSnapshot],
        kd: KernelDrops,
    ) -> serde_json::Value {
        serde_json::json!({
            "total": total.to_json(),
            "kernel": kd.json(),
            "per_queue": snaps.iter().map(WorkerSnapshot::to_json).collect::<Vec<_>>(),
            "peers": self.peers_json(),
        })
    }

    /// The peers part of a report (JSON form), or null.
    fn peers_json(&self) -> serde_json::Value {
        let Some((count, prefixes, top)) = top_peers(&self.sources.peers, self.peers_shown) else {
            return serde_json::Value::Null;
        };
        let now = unix_now_ns();
        let shown: Vec<serde_json::Value> = top
            .iter()
            .map(|(addr, s)| {
                let mut v = s.to_json(now);
                v["peer"] = addr.as_str().into();
                v
            })
            .collect();
        serde_json::json!({ "count": count, "prefixes": prefixes, "top": shown })
    }
}
