//! Runtime: sets up the device and sockets, runs one worker thread per TUN
//! queue, turns SIGINT/SIGTERM into a clean shutdown, and reports stats.
//!
//! Control flow uses crossbeam channels (signals, worker exits, the stats
//! tick); packets never cross threads.

use std::io::{self, Write};
use std::net::UdpSocket;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver};
use nix::sys::signal::{SigSet, Signal};

use crate::config::{CpuPlan, DEFAULT_SOCKET_BUFFER_BYTES, StatsFormat, TunnelConfig};
use crate::datapath::{Datapath, VisitLimits};
use crate::device::{TunDevice, TunOptions};
use crate::engine::{Engine, Shutdown, WorkerEvent, WorkerParts, spawn_worker};
use crate::error::{Error, Result};
use crate::forward::Forwarder;
use crate::peers::{PeerTable, SharedPeers};
use crate::stats::{WorkerSnapshot, WorkerStats};

/// The signals tunfwd handles: SIGINT and SIGTERM stop it cleanly, SIGHUP
/// reloads the peers file.
fn handled_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGHUP);
    set
}

/// Blocks SIGINT, SIGTERM and SIGHUP in the calling thread, so every thread
/// spawned later inherits the mask and only the signal thread receives
/// them. Call first thing in `main`.
pub fn block_stop_signals() -> Result<()> {
    handled_signals()
        .thread_block()
        .map_err(|e| Error::io("block SIGINT/SIGTERM/SIGHUP", e.into()))
}

/// The peer table for `cfg` (a reflector's has one unused peer), keeping
/// the counters of peers that `old` has too.
fn peer_table(cfg: &TunnelConfig, old: Option<&PeerTable>) -> Result<PeerTable> {
    if cfg.mode.is_reflect() {
        return Ok(PeerTable::single(
            std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
            false,
        ));
    }
    let specs = cfg.load_peers()?;
    PeerTable::build(&specs, cfg.queues, cfg.mode.is_tap(), old).map_err(|e| {
        Error::config(match &cfg.peers_file {
            Some(f) => format!("peers (--peer and {}): {e}", f.display()),
            None => format!("peers: {e}"),
        })
    })
}

/// SIGHUP: reads the peers again and swaps the table in whole, or keeps
/// the old one and says why in one line.
fn reload_peers(cfg: &TunnelConfig, shared: &SharedPeers) {
    let Some(path) = &cfg.peers_file else {
        crate::info!("SIGHUP: no --peers-file to reload; peers unchanged");
        return;
    };
    let (_, old) = shared.load();
    match peer_table(cfg, Some(&old)) {
        Ok(new) => {
            let had: std::collections::HashSet<_> = old.peers().iter().map(|p| p.addr).collect();
            let has: std::collections::HashSet<_> = new.peers().iter().map(|p| p.addr).collect();
            let added = has.difference(&had).count();
            let removed = had.difference(&has).count();
            let (peers, prefixes) = (new.len(), new.prefixes());
            shared.store(Arc::new(new));
            crate::info!(
                "peers reloaded from {}: {peers} peers, {prefixes} prefixes ({added} added, {removed} removed)",
                path.display()
            );
        }
        Err(e) => crate::info!(
            "peers reload refused, keeping the {} peers in use: {e}",
            old.len()
        ),
    }
}

/// What the reports read: every worker's counters, the peer table, and
/// the kernel's drop counters (as the increase since start). Shared with
/// the metrics server; reading never blocks a worker.
pub(crate) struct Sources {
    pub workers: Vec<Arc<WorkerStats>>,
    pub peers: Arc<SharedPeers>,
    pub dev: String,
    pub engine: &'static str,
    pub started: Instant,
    inodes: Vec<u64>,
    base_udp: u64,
    base_tun: u64,
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
    pub fn snapshots(&self) -> Vec<WorkerSnapshot> {
        self.workers.iter().map(|s| s.snapshot()).collect()
    }

    pub fn kernel_drops(&self) -> KernelDrops {
        KernelDrops {
            udp_rcvbuf: crate::platform::udp_socket_drops(&self.inodes)
                .map(|d| d.saturating_sub(self.base_udp)),
            tun_queue: crate::platform::device_tx_drops(&self.dev)
                .map(|d| d.saturating_sub(self.base_tun)),
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
type TopPeers = (
    usize,
    usize,
    Vec<(std::net::SocketAddr, crate::peers::PeerSnapshot)>,
);

/// The `n` peers with the most traffic, with the table's size (None for a
/// point-to-point table).
fn top_peers(shared: &SharedPeers, n: usize) -> Option<TopPeers> {
    let (_, table) = shared.load();
    (!table.is_single()).then(|| (table.len(), table.prefixes(), table.top(n)))
}

/// Prints the peers part of a report after `prefix` (text form).
fn print_peers(prefix: &str, shared: &SharedPeers, n: usize) {
    let Some((count, prefixes, top)) = top_peers(shared, n) else {
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

/// The peers part of a report (JSON form), or null.
fn peers_json(shared: &SharedPeers, n: usize) -> serde_json::Value {
    let Some((count, prefixes, top)) = top_peers(shared, n) else {
        return serde_json::Value::Null;
    };
    let now = unix_now_ns();
    let shown: Vec<serde_json::Value> = top
        .iter()
        .map(|(addr, s)| {
            let mut v = s.to_json(now);
            v["peer"] = addr.to_string().into();
            v
        })
        .collect();
    serde_json::json!({ "count": count, "prefixes": prefixes, "top": shown })
}

enum Event {
    Signal(Signal),
    Worker(WorkerEvent),
}

/// The CPU of each worker, if pinned. `auto` pins only with 2+ queues: a
/// single worker is left to the scheduler (pinning every one-queue
/// forwarder on a host to the same CPU would make them compete).
fn worker_cpus(plan: &CpuPlan, queues: usize) -> Result<Vec<Option<usize>>> {
    let list = match plan {
        CpuPlan::None => return Ok(vec![None; queues]),
        CpuPlan::Spread if queues == 1 => return Ok(vec![None]),
        CpuPlan::Spread => {
            let allowed =
                crate::platform::allowed_cpus().map_err(|e| Error::io("read CPU affinity", e))?;
            if allowed.is_empty() {
                return Ok(vec![None; queues]);
            }
            allowed
        }
        CpuPlan::List(list) => list.clone(),
    };
    Ok((0..queues).map(|q| Some(list[q % list.len()])).collect())
}

/// Applies the socket buffer sizes; as root beyond the sysctl maximum.
/// Returns a line to log if the kernel gave less than asked (the sysctl
/// maximum clamps an unprivileged process).
fn set_socket_buffers(
    sock: &UdpSocket,
    addr: std::net::SocketAddr,
    sndbuf: Option<usize>,
    rcvbuf: Option<usize>,
) -> Result<Option<String>> {
    use nix::sys::socket::{getsockopt, sockopt};
    let mut short = Vec::new();
    if let Some(n) = sndbuf {
        crate::platform::set_sndbuf(sock, n)
            .map_err(|e| Error::io(format!("set SO_SNDBUF {n} on UDP socket {addr}"), e))?;
        // The kernel reports twice what it reserves for data.
        if let Ok(got) = getsockopt(sock, sockopt::SndBuf) {
            if got / 2 < n {
                short.push(format!(
                    "send buffer {} of {n} bytes (net.core.wmem_max)",
                    got / 2
                ));
            }
        }
    }
    if let Some(n) = rcvbuf {
        crate::platform::set_rcvbuf(sock, n)
            .map_err(|e| Error::io(format!("set SO_RCVBUF {n} on UDP socket {addr}"), e))?;
        if let Ok(got) = getsockopt(sock, sockopt::RcvBuf) {
            if got / 2 < n {
                short.push(format!(
                    "receive buffer {} of {n} bytes (net.core.rmem_max)",
                    got / 2
                ));
            }
        }
    }
    Ok((!short.is_empty()).then(|| {
        format!(
            "UDP socket {addr}: {}; bursts beyond them are lost: run with CAP_NET_ADMIN or raise the sysctls",
            short.join(", ")
        )
    }))
}

/// Writes one line to stdout, ignoring a closed stdout (never panics).
fn out(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(io::stdout().lock(), "{line}");
}

/// Runs `tunfwd tunnel` until SIGINT/SIGTERM (Ok) or a worker fails (Err).
/// The summary is printed in both cases.
pub fn run_tunnel(cfg: &TunnelConfig) -> Result<()> {
    cfg.validate()?;
    if cfg.exit_with_parent {
        // SIGTERM is blocked and taken by the signal thread: a clean stop.
        crate::platform::set_parent_death_signal()
            .map_err(|e| Error::io("set parent-death signal", e))?;
    }
    #[cfg(target_os = "linux")]
    if let Some(path) = &cfg.netns {
        // Before any socket or device: everything below lives in it.
        crate::netns::NetNs::open(path)?.enter()?;
    }

    // The peers (and the file) before anything is created: a bad one stops
    // here.
    let peers = Arc::new(SharedPeers::new(Arc::new(peer_table(cfg, None)?)));
    let engine = Engine::choose(cfg)?;
    let offload = engine.offload(cfg);
    let cpus = worker_cpus(&cfg.cpus, cfg.queues)?;

    // Sockets first: a port in use fails before a device is created.
    let mut sockets = Vec::with_capacity(cfg.queues);
    for q in 0..cfg.queues {
        let addr = cfg.listen_for(q);
        let sock = UdpSocket::bind(addr).map_err(|e| {
            let hint = match e.raw_os_error() {
                Some(libc::EADDRINUSE) => Some("another process uses this port"),
                Some(libc::EADDRNOTAVAIL) => Some("the address is not on this host"),
                _ => None,
            };
            let err = Error::io(format!("bind UDP socket {addr} for queue {q}"), e);
            match hint {
                Some(h) => err.with_hint(h),
                None => err,
            }
        })?;
        // Tunnels get buffers that hold GSO bursts by default; a reflector
        // sends nothing to the network.
        let default = (!cfg.mode.is_reflect()).then_some(DEFAULT_SOCKET_BUFFER_BYTES);
        let clamped =
            set_socket_buffers(&sock, addr, cfg.sndbuf.or(default), cfg.rcvbuf.or(default))?;
        if let (Some(line), 0) = (clamped, q) {
            crate::info!("{line}");
        }
        if let Err(e) = crate::platform::enable_recverr(&sock) {
            crate::info!("{addr}: ICMP errors will not be counted (IP_RECVERR: {e})");
        }
        if offload {
            if let Err(e) = crate::platform::enable_udp_gro(&sock) {
                crate::info!(
                    "offload: UDP GRO unavailable on {addr} ({e}): one datagram per receive"
                );
            }
        }
        sockets.push(sock);
    }

    // The metrics port too, before anything is created (and before
    // privileges are dropped).
    let metrics = cfg
        .metrics
        .map(crate::metrics::Listener::bind)
        .transpose()?;

    let device = TunDevice::open(&TunOptions {
        name: &cfg.dev,
        queues: cfg.queues,
        attach: cfg.attach,
        vnet_hdr: offload,
        tap: cfg.mode.is_tap(),
    })?;
    #[cfg(target_os = "linux")]
    if let crate::config::Mode::Tap { mac: Some(mac), .. } = cfg.mode {
        device.set_mac(mac)?;
    }
    let dev_name = device.name().to_string();
    let created = device.created();
    let txqueuelen = if created {
        Some(cfg.created_txqueuelen())
    } else {
        cfg.txqueuelen
    };
    device.configure(cfg.mtu, &cfg.addresses, txqueuelen)?;
    #[cfg(target_os = "linux")]
    if offload {
        let got = device.enable_offloads()?;
        crate::info!(
            "offload: TSO {}, USO {}, UDP GSO/GRO on",
            if got.tso { "on" } else { "off" },
            if got.uso { "on" } else { "off (Linux 6.2+)" }
        );
        if let Err(e) = device.limit_gso_segments(cfg.mtu as usize) {
            crate::info!(
                "offload: {e}: a super-packet of more segments than one UDP GSO send carries goes out in two sends"
            );
        }
    }
    let queues = device.into_queues();
    let inodes: Vec<u64> = sockets
        .iter()
        .filter_map(crate::platform::socket_inode)
        .collect();
    // The kernel's drops at our sockets (receive buffer full) and on the
    // way into the device (its queue to us full): reported next to
    // tunfwd's own, as the increase since start.
    let base_udp = crate::platform::udp_socket_drops(&inodes).unwrap_or(0);
    let base_tun = crate::platform::device_tx_drops(&dev_name).unwrap_or(0);

    let shutdown = Arc::new(Shutdown::new()?);
    let (events_tx, events_rx) = channel::unbounded::<Event>();

    // The signal thread: the only one with SIGINT/SIGTERM deliverable (via
    // sigwait; the mask is blocked everywhere).
    {
        let tx = events_tx.clone();
        thread::Builder::new()
            .name("tunfwd-signals".into())
            .spawn(move || {
                let set = handled_signals();
                while let Ok(sig) = set.wait() {
                    if tx.send(Event::Signal(sig)).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| Error::io("spawn signal thread", e))?;
    }

    let mut all_stats = Vec::with_capacity(cfg.queues);
    let mut handles = Vec::with_capacity(cfg.queues);
    for (q, (tun, udp)) in queues.into_iter().zip(sockets).enumerate() {
        let stats = Arc::new(WorkerStats::default());
        all_stats.push(stats.clone());
        let label = format!("TUN queue {q} of {dev_name}");
        let forwarder =
            Forwarder::for_mode(&cfg.mode, cfg.mtu as usize, peers.load().1).with_queue(q);
        let parts = WorkerParts {
            tun,
            udp,
            datapath: Datapath::new(label, forwarder, stats, offload)
                .with_shared_peers(peers.clone())
                .with_device(&dev_name)
                .with_aqm(cfg.aqm)
                .with_flow_queues(
                    cfg.aqm.filter(|_| cfg.flow_queueing()),
                    cfg.aqm_inflight_bytes,
                )
                .with_visit_limits(VisitLimits {
                    packets: cfg.batch,
                    bytes: cfg.visit_bytes,
                }),
            shutdown: shutdown.clone(),
            busy_poll: cfg.busy_poll,
        };
        let tx = events_tx.clone();
        let report = move |ev| {
            let _ = tx.send(Event::Worker(ev));
        };
        handles.push(spawn_worker(q, engine.clone(), parts, cpus[q], report)?);
    }

    // Wait until every worker is set up (or one failed, or a signal came).
    let mut ready = 0;
    let mut setup_error = None;
    let mut stopped_early = false;
    while ready < cfg.queues && setup_error.is_none() && !stopped_early {
        match events_rx.recv() {
            Ok(Event::Worker(WorkerEvent::Ready(None))) => ready += 1,
            Ok(Event::Worker(WorkerEvent::Ready(Some(e)))) => setup_error = Some(e),
            Ok(Event::Signal(Signal::SIGHUP)) => reload_peers(cfg, &peers),
            Ok(Event::Signal(sig)) => {
                crate::info!("{} received during setup, stopping", sig.as_str());
                stopped_early = true;
            }
            Ok(Event::Worker(WorkerEvent::Exited)) => {}
            Err(_) => stopped_early = true,
        }
    }
    if setup_error.is_some() || stopped_early {
        shutdown.trigger();
        for h in handles {
            let _ = h.join();
        }
        return match setup_error {
            Some(e) => Err(e),
            None => Ok(()),
        };
    }

    // Everything privileged is done: devices, sockets, rings, pinning.
    if let Some(spec) = &cfg.user {
        if let Err(e) = crate::platform::drop_privileges(spec) {
            shutdown.trigger();
            for h in handles {
                let _ = h.join();
            }
            return Err(e);
        }
    }

    let started = Instant::now();
    let sources = Arc::new(Sources {
        workers: all_stats,
        peers: peers.clone(),
        dev: dev_name.clone(),
        engine: engine.name(),
        started,
        inodes,
        base_udp,
        base_tun,
    });
    let metrics_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let metrics_thread = match metrics {
        Some(l) => {
            let addr = l.addr();
            let h = l.serve(sources.clone(), metrics_stop.clone());
            match h {
                Ok(h) => {
                    crate::info!("metrics at http://{addr}/metrics");
                    Some(h)
                }
                Err(e) => {
                    shutdown.trigger();
                    for h in handles {
                        let _ = h.join();
                    }
                    return Err(e);
                }
            }
        }
        None => None,
    };
    let path = {
        let (_, t) = peers.load();
        if cfg.mode.is_reflect() {
            "reflecting echo requests and UDP back into the device".to_string()
        } else if t.is_single() {
            format!("udp {} -> {}", cfg.listen, t.peer(0).addr)
        } else {
            format!(
                "udp {} -> {} peers by {} prefixes",
                cfg.listen,
                t.len(),
                t.prefixes()
            )
        }
    };
    crate::info!(
        "tunnel up: dev {dev_name} ({}), mtu {}, {} queue(s), engine {}, {path}",
        if created { "created" } else { "attached" },
        cfg.mtu,
        cfg.queues,
        engine.name(),
    );

    let ticker: Receiver<Instant> = if cfg.stats_interval_secs > 0 {
        channel::tick(Duration::from_secs(cfg.stats_interval_secs))
    } else {
        channel::never()
    };
    let mut last = WorkerSnapshot::default();
    let mut last_at = started;
    loop {
        channel::select! {
            recv(events_rx) -> ev => match ev {
                Ok(Event::Signal(Signal::SIGHUP)) => reload_peers(cfg, &peers),
                Ok(Event::Signal(sig)) => {
                    crate::info!("{} received, stopping", sig.as_str());
                    break;
                }
                Ok(Event::Worker(WorkerEvent::Exited)) | Err(_) => break,
                Ok(Event::Worker(WorkerEvent::Ready(_))) => {}
            },
            recv(ticker) -> _ => {
                let now = Instant::now();
                let snaps = sources.snapshots();
                let total = WorkerSnapshot::sum(&snaps);
                let secs = now.duration_since(last_at).as_secs_f64().max(1e-9);
                let pps = (total.packets() - last.packets()) as f64 / secs;
                let bytes = (total.tun_to_peer.bytes + total.peer_to_tun.bytes)
                    - (last.tun_to_peer.bytes + last.peer_to_tun.bytes);
                let t = now.duration_since(started).as_secs_f64();
                let mbps = bytes as f64 * 8.0 / secs / 1e6;
                let kd = sources.kernel_drops();
                match cfg.stats_format {
                    StatsFormat::Text => {
                        out(format_args!(
                            "tunfwd: stats t={t:.1}s rate_pps={pps:.0} rate_mbps={mbps:.1} total {total}{}",
                            kd.text(),
                        ));
                        if snaps.len() > 1 {
                            for (q, s) in snaps.iter().enumerate() {
                                out(format_args!("tunfwd: stats queue={q} {s}"));
                            }
                        }
                        print_peers("stats", &peers, cfg.stats_peers);
                    }
                    StatsFormat::Json => out(format_args!("{}", serde_json::json!({
                        "event": "stats",
                        "t": t,
                        "rate_pps": pps,
                        "rate_mbps": mbps,
                        "total": total.to_json(),
                        "kernel": kd.json(),
                        "per_queue": snaps.iter().map(WorkerSnapshot::to_json).collect::<Vec<_>>(),
                        "peers": peers_json(&peers, cfg.stats_peers),
                    }))),
                }
                last = total;
                last_at = now;
            },
        }
    }

    // Read while the workers still own their sockets.
    let kd = sources.kernel_drops();
    metrics_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(h) = metrics_thread {
        let _ = h.join();
    }
    shutdown.trigger();
    let mut first_error = None;
    for h in handles {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(_) => {
                first_error.get_or_insert(Error::config("a worker thread panicked"));
            }
        }
    }

    let snaps = sources.snapshots();
    let total = WorkerSnapshot::sum(&snaps);
    let elapsed = started.elapsed().as_secs_f64();
    match cfg.stats_format {
        StatsFormat::Text => {
            out(format_args!(
                "tunfwd: summary dev={dev_name} engine={} queues={} elapsed_s={elapsed:.2}",
                engine.name(),
                cfg.queues,
            ));
            out(format_args!("tunfwd: summary total {total}"));
            let kd = kd.text();
            if !kd.is_empty() {
                out(format_args!("tunfwd: summary kernel{kd}"));
            }
            if snaps.len() > 1 {
                for (q, s) in snaps.iter().enumerate() {
                    out(format_args!("tunfwd: summary queue={q} {s}"));
                }
            }
            print_peers("summary", &peers, cfg.stats_peers);
        }
        StatsFormat::Json => out(format_args!(
            "{}",
            serde_json::json!({
                "event": "summary",
                "dev": dev_name,
                "engine": engine.name(),
                "queues": cfg.queues,
                "elapsed_s": elapsed,
                "total": total.to_json(),
                "kernel": kd.json(),
                "per_queue": snaps.iter().map(WorkerSnapshot::to_json).collect::<Vec<_>>(),
                "peers": peers_json(&peers, cfg.stats_peers),
            })
        )),
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
