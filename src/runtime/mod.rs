//! Runtime: sets up the device and sockets, runs one worker thread per TUN
//! queue, turns SIGINT/SIGTERM into a clean shutdown, and reports stats.
//!
//! Control flow uses crossbeam channels (signals, worker exits, the stats
//! tick); packets never cross threads.

use std::net::UdpSocket;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver};
use nix::sys::signal::{SigSet, Signal};

use crate::config::{CpuPlan, DEFAULT_SOCKET_BUFFER_BYTES, TunnelConfig};
use crate::datapath::{Setup, VisitLimits};
use crate::device::{TunDevice, TunOptions};
use crate::engine::{Engine, Shutdown, WorkerEvent, WorkerParts, spawn_worker};
use crate::error::{Error, Result};
use crate::forward::Forwarder;
use crate::peers::{PeerTable, SharedPeers};
use crate::report::{KernelBase, Reporter, Sources};
use crate::stats::WorkerStats;

mod uapi;
mod wg;

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
    let text = match &cfg.peers.file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| Error::io(format!("read peers file {}", path.display()), e))?,
        ),
        None => None,
    };
    let specs = cfg.peers_with_file(text.as_deref(), crate::platform::parse_endpoint)?;
    PeerTable::build(&specs, cfg.engine.queues, cfg.mode.is_tap(), old).map_err(|e| {
        let place = match e.peer_index() {
            Some(i) => cfg.peer_origin(i, text.as_deref()),
            None => match &cfg.peers.file {
                Some(f) => format!("peers (--peer and {})", f.display()),
                None => "peers".to_string(),
            },
        };
        Error::config(format!("{place}: {e}"))
    })
}

/// SIGHUP: reads the peers again and swaps the table in whole, or keeps
/// the old one and says why in one line.
fn reload_peers(cfg: &TunnelConfig, shared: &SharedPeers) {
    if cfg.mode.is_wireguard() {
        crate::info!("SIGHUP: WireGuard is reloaded once the tunnel is up");
        return;
    }
    let Some(path) = &cfg.peers.file else {
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

enum Event {
    Signal(Signal),
    Worker(WorkerEvent),
    /// WireGuard's listen port changed (`wg`): restart the workers on
    /// sockets bound to this port. The reply carries duplicates of the new
    /// sockets, or why nothing changed.
    Rebind(
        u16,
        channel::Sender<std::result::Result<Vec<UdpSocket>, String>>,
    ),
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

/// `--queues auto`: fewer queues where more would not work here, said in
/// one line: an existing device made without multi_queue takes one, and
/// io_uring's rings must fit the locked-memory limit.
fn fit_auto_queues(cfg: &mut TunnelConfig) {
    let wanted = cfg.engine.queues;
    if !cfg.engine.queues_auto || wanted < 2 {
        return;
    }
    #[cfg(target_os = "linux")]
    if TunDevice::takes_one_queue(&cfg.device.dev) {
        crate::info!(
            "queues auto: {} exists without multi_queue: 1 queue",
            cfg.device.dev
        );
        cfg.engine.queues = 1;
        return;
    }
    if let (n, Some(why)) = Engine::queues_fit(cfg) {
        crate::info!("queues auto: {why}: {n} queue(s) instead of {wanted}");
        cfg.engine.queues = n;
    }
}

/// Runs `tunfwd tunnel` until SIGINT/SIGTERM (Ok) or a worker fails (Err).
/// The summary is printed in both cases.
pub fn run_tunnel(cfg: &TunnelConfig) -> Result<()> {
    run_tunnel_then(cfg, || {})
}

/// [`run_tunnel`], calling `up` once the tunnel is up (the device, its
/// workers, and with WireGuard the API socket all exist): `tunfwd-wg`
/// returns to wg-quick then.
pub fn run_tunnel_then(cfg: &TunnelConfig, up: impl FnOnce()) -> Result<()> {
    cfg.validate()?;
    enter_process_context(cfg)?;
    // In the namespace the device is in (it may exist already).
    let mut fitted = cfg.clone();
    fit_auto_queues(&mut fitted);
    let cfg = &fitted;
    // The peers (and the files) before anything is created: a bad one
    // stops here. WireGuard's file gives the peers and the port.
    let (wg_conf, resolved, table) = match wg::load(cfg)? {
        Some(l) => (Some(l.conf.clone()), l.resolve(cfg), l.table),
        None => (None, cfg.clone(), peer_table(cfg, None)?),
    };
    let cfg = &resolved;
    let peers = Arc::new(SharedPeers::new(Arc::new(table)));
    let engine = Engine::choose(cfg)?;
    let offload = engine.offload(cfg);
    let cpus = worker_cpus(&cfg.engine.cpus, cfg.engine.queues)?;
    // Sockets first: a port in use fails before a device is created; the
    // metrics port too (and before privileges are dropped).
    let sockets = open_sockets(cfg, offload)?;
    let metrics = cfg
        .service
        .metrics
        .map(crate::metrics::Listener::bind)
        .transpose()?;
    let device = open_device(cfg, offload)?;
    let (dev_name, created) = (device.name().to_string(), device.created());
    let kernel = KernelBase::read(&sockets, &dev_name);

    let (events_tx, events) = channel::unbounded::<Event>();
    spawn_signal_thread(events_tx.clone())?;
    // WireGuard: the keys and sessions every worker shares.
    let wg = wg::device(wg_conf.as_ref(), &sockets, &peers, cfg, &events_tx)?;
    let mut restart = Restart {
        cfg: cfg.clone(),
        engine: &engine,
        peers: &peers,
        cpus,
        offload,
        wg: wg.as_ref().map(|w| &w.dev),
        events_tx: events_tx.clone(),
        spare: Restart::spare(wg.is_some(), &device)?,
    };
    if cfg.engine.wake_nice < 0 {
        // Before privileges go: the workers raise their priority on every
        // wakeup, after --user too.
        crate::platform::allow_nice(cfg.engine.wake_nice);
    }
    let mut workers = restart.start(device, sockets, None)?;
    if !workers.wait_ready(cfg, &events, &peers)? {
        return workers.stop(None);
    }
    let control_stop = Arc::new(AtomicBool::new(false));
    let control = match wg::control(wg.as_ref(), &workers.stats[0], &control_stop) {
        Ok(h) => h,
        Err(e) => return workers.stop(Some(e)),
    };
    // WireGuard's userspace API, for `wg` (before privileges go: the
    // socket's directory is root's).
    let uapi = match wg::serve(wg.as_ref(), &dev_name, cfg) {
        Ok(s) => s,
        Err(e) => return workers.stop(Some(e)),
    };
    // Everything privileged is done: devices, sockets, rings, pinning.
    if let Some(spec) = &cfg.service.user {
        if let Err(e) = crate::platform::drop_privileges(spec) {
            return workers.stop(Some(e));
        }
    }
    let sources = Arc::new(Sources::new(
        workers.stats.clone(),
        peers.clone(),
        &dev_name,
        engine.name(),
        kernel,
    ));
    let metrics_stop = Arc::new(AtomicBool::new(false));
    let metrics_thread = match metrics.map(|l| serve_metrics(l, &sources, &metrics_stop)) {
        Some(Err(e)) => return workers.stop(Some(e)),
        Some(Ok(h)) => Some(h),
        None => None,
    };
    crate::info!(
        "tunnel up: dev {dev_name} ({}), mtu {}, {} queue(s), engine {}, {}",
        if created { "created" } else { "attached" },
        cfg.device.mtu,
        cfg.engine.queues,
        engine.name(),
        describe_path(cfg, &peers),
    );
    up();

    let mut reporter = Reporter::new(
        sources.clone(),
        cfg.service.stats_format,
        cfg.service.stats_peers,
    );
    let mut reload = || match &wg {
        Some(w) => wg::reload(w, cfg),
        None => reload_peers(cfg, &peers),
    };
    run_until_stopped(cfg, &events, &mut reload, &mut reporter, |port| {
        restart.rebind(port, &mut workers, &events)
    });

    drop(restart);
    // Read while the workers still own their sockets.
    let kd = sources.kernel_drops();
    for stop in [&metrics_stop, &control_stop] {
        stop.store(true, Ordering::Relaxed);
    }
    for h in [metrics_thread, control].into_iter().flatten() {
        let _ = h.join();
    }
    if let Some(u) = uapi {
        u.stop();
    }
    let result = workers.stop(None);
    reporter.summary(cfg.engine.queues, kd);
    result
}

/// Before any socket or device: the parent-death signal and the network
/// namespace everything below lives in.
fn enter_process_context(cfg: &TunnelConfig) -> Result<()> {
    if cfg.service.exit_with_parent {
        // SIGTERM is blocked and taken by the signal thread: a clean stop.
        crate::platform::set_parent_death_signal()
            .map_err(|e| Error::io("set parent-death signal", e))?;
    }
    #[cfg(target_os = "linux")]
    if let Some(path) = &cfg.service.netns {
        crate::netns::NetNs::open(path)?.enter()?;
    }
    Ok(())
}

/// One UDP socket per queue, bound, with its buffers, error queue and GRO.
fn open_sockets(cfg: &TunnelConfig, offload: bool) -> Result<Vec<UdpSocket>> {
    let mut sockets: Vec<UdpSocket> = Vec::with_capacity(cfg.engine.queues);
    for q in 0..cfg.engine.queues {
        let mut addr = cfg.listen_for(q);
        // A port shared by every queue: the one the first socket got.
        if let (true, Some(first)) = (cfg.shares_port(), sockets.first()) {
            addr = first.local_addr().unwrap_or(addr);
        }
        let bound = if cfg.shares_port() {
            // SO_REUSEPORT lets another process of our user join the group
            // and take a share of the datagrams: a plain bind first finds
            // the port taken (or the kernel picks a free one for port 0),
            // and the group then binds it.
            let probe = if q == 0 {
                UdpSocket::bind(addr).and_then(|p| p.local_addr())
            } else {
                Ok(addr)
            };
            probe.and_then(|a| {
                addr = a;
                crate::platform::bind_udp_shared(a)
            })
        } else {
            UdpSocket::bind(addr)
        };
        let sock = bound.map_err(|e| {
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
        let clamped = set_socket_buffers(
            &sock,
            addr,
            cfg.engine.sndbuf.or(default),
            cfg.engine.rcvbuf.or(default),
        )?;
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
    if cfg.steers_by_inner_flow() {
        if let Err(e) = crate::platform::steer_by_inner_flow(&sockets[0], sockets.len()) {
            crate::info!(
                "queues: receives on {} cannot be steered by inner flow ({e}): the kernel \
                 hands each peer's datagrams to one worker",
                cfg.listen_for(0)
            );
        }
    }
    Ok(sockets)
}

/// Opens (or attaches to) the device and configures it: MAC, MTU,
/// addresses, transmit queue, offloads.
fn open_device(cfg: &TunnelConfig, offload: bool) -> Result<TunDevice> {
    let device = TunDevice::open(&TunOptions {
        name: &cfg.device.dev,
        queues: cfg.engine.queues,
        attach: cfg.device.attach,
        vnet_hdr: offload,
        tap: cfg.mode.is_tap(),
    })?;
    #[cfg(target_os = "linux")]
    if let crate::config::Mode::Tap { mac: Some(mac), .. } = cfg.mode {
        device.set_mac(mac)?;
    }
    let txqueuelen = if device.created() {
        Some(cfg.created_txqueuelen())
    } else {
        cfg.device.txqueuelen
    };
    device.configure(cfg.device.mtu, &cfg.device.addresses, txqueuelen)?;
    #[cfg(target_os = "linux")]
    if offload {
        let got = device.enable_offloads()?;
        crate::info!(
            "offload: TSO {}, USO {}, UDP GSO/GRO on",
            if got.tso { "on" } else { "off" },
            if got.uso { "on" } else { "off (Linux 6.2+)" }
        );
        if let Err(e) = device.limit_gso_segments(cfg.device.mtu as usize) {
            crate::info!(
                "offload: {e}: a super-packet of more segments than one UDP GSO send carries goes out in two sends"
            );
        }
    }
    Ok(device)
}

/// The signal thread: the only one with SIGINT/SIGTERM/SIGHUP deliverable
/// (via sigwait; the mask is blocked everywhere).
fn spawn_signal_thread(tx: channel::Sender<Event>) -> Result<()> {
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
        .map(drop)
        .map_err(|e| Error::io("spawn signal thread", e))
}

/// The workers, one per queue: started, waited for until ready, stopped.
struct Workers {
    handles: Vec<thread::JoinHandle<Result<()>>>,
    stats: Vec<Arc<WorkerStats>>,
    shutdown: Arc<Shutdown>,
}

impl Workers {
    /// Starts one worker per queue of `device`, each with its socket, its
    /// datapath and its CPU.
    #[allow(clippy::too_many_arguments)]
    fn start(
        cfg: &TunnelConfig,
        engine: &Engine,
        peers: &Arc<SharedPeers>,
        device: TunDevice,
        sockets: Vec<UdpSocket>,
        cpus: Vec<Option<usize>>,
        offload: bool,
        wg: Option<&Arc<crate::wg::Device>>,
        events: &channel::Sender<Event>,
        stats: Option<Vec<Arc<WorkerStats>>>,
    ) -> Result<Workers> {
        let dev_name = device.name().to_string();
        let mut workers = Workers {
            handles: Vec::with_capacity(cfg.engine.queues),
            stats: Vec::with_capacity(cfg.engine.queues),
            shutdown: Arc::new(Shutdown::new()?),
        };
        for (q, (tun, udp)) in device.into_queues().into_iter().zip(sockets).enumerate() {
            let stats = stats
                .as_ref()
                .and_then(|s| s.get(q).cloned())
                .unwrap_or_default();
            workers.stats.push(stats.clone());
            let label = format!("TUN queue {q} of {dev_name}");
            let mut forwarder =
                Forwarder::for_mode(&cfg.mode, cfg.device.mtu as usize, peers.load().1)
                    .with_queue(q);
            if cfg.shares_port() {
                forwarder = forwarder.sharing_port();
            }
            let parts = WorkerParts {
                tun,
                udp,
                datapath: wg
                    .iter()
                    .fold(Setup::new(label, forwarder, stats, offload), |s, d| {
                        s.with_wireguard((*d).clone())
                    })
                    .with_shared_peers(peers.clone())
                    .with_device(&dev_name)
                    .with_aqm(cfg.queueing.aqm)
                    .with_flow_queues(
                        cfg.queueing.aqm.filter(|_| cfg.flow_queueing()),
                        cfg.queueing.inflight_bytes,
                    )
                    .with_visit_limits(VisitLimits {
                        packets: cfg.engine.batch,
                        bytes: cfg.engine.visit_bytes,
                    }),
                shutdown: workers.shutdown.clone(),
                busy_poll: cfg.engine.busy_poll,
                wake: (cfg.engine.wake_nice < 0)
                    .then_some((cfg.engine.wake_nice, cfg.engine.wake_budget)),
                spin: engine.spin(cfg.engine.spin_us),
            };
            let tx = events.clone();
            let report = move |ev| {
                let _ = tx.send(Event::Worker(ev));
            };
            match spawn_worker(q, engine.clone(), parts, cpus[q], report) {
                Ok(h) => workers.handles.push(h),
                Err(e) => {
                    // Stop the workers already started; the spawn error is
                    // the one to report.
                    let _ = workers.stop(None);
                    return Err(e);
                }
            }
        }
        Ok(workers)
    }

    /// Waits until every worker is set up: Ok(true); a stop signal during
    /// set-up: Ok(false); a worker that failed: its error.
    fn wait_ready(
        &self,
        cfg: &TunnelConfig,
        events: &Receiver<Event>,
        peers: &SharedPeers,
    ) -> Result<bool> {
        let mut ready = 0;
        while ready < self.handles.len() {
            match events.recv() {
                Ok(Event::Worker(WorkerEvent::Ready(None))) => ready += 1,
                Ok(Event::Worker(WorkerEvent::Ready(Some(e)))) => return Err(e),
                Ok(Event::Signal(Signal::SIGHUP)) => reload_peers(cfg, peers),
                Ok(Event::Signal(sig)) => {
                    crate::info!("{} received during setup, stopping", sig.as_str());
                    return Ok(false);
                }
                Ok(Event::Worker(WorkerEvent::Exited)) => {}
                Ok(Event::Rebind(_, reply)) => {
                    let _ = reply.send(Err("the tunnel is starting".into()));
                }
                Err(_) => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Stops every worker and waits for it: `error` if given, else the
    /// first worker's error (or a panic), else Ok.
    fn stop(mut self, error: Option<Error>) -> Result<()> {
        self.stop_all(error)
    }

    /// [`Workers::stop`], leaving `self` without workers.
    fn stop_all(&mut self, error: Option<Error>) -> Result<()> {
        self.shutdown.trigger();
        let mut first_error = error;
        for h in self.handles.drain(..) {
            let e = match h.join() {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e,
                Err(_) => Error::config("a worker thread panicked"),
            };
            first_error.get_or_insert(e);
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// What starting the workers takes, kept to start them again on new
/// sockets when WireGuard's listen port changes (`wg set listen-port`,
/// `wg setconf` by wg-quick): the old workers stop, and new ones take
/// the same queues (through the spare handle on them, which keeps the
/// device meanwhile), the same counters and the same peers. Packets in
/// the old workers' queues are lost; sessions are the device's and go on.
struct Restart<'a> {
    cfg: TunnelConfig,
    engine: &'a Engine,
    peers: &'a Arc<SharedPeers>,
    cpus: Vec<Option<usize>>,
    offload: bool,
    wg: Option<&'a Arc<crate::wg::Device>>,
    events_tx: channel::Sender<Event>,
    spare: Option<TunDevice>,
}

impl Restart<'_> {
    /// A spare handle on `device`'s queues, if the port may change (with
    /// WireGuard, `wg` may move it): it keeps the device while the
    /// workers restart.
    fn spare(wireguard: bool, device: &TunDevice) -> Result<Option<TunDevice>> {
        wireguard.then(|| device.try_clone()).transpose()
    }

    /// Workers on `device`'s queues and `sockets`, counting into `stats`
    /// (new counters if None).
    fn start(
        &self,
        device: TunDevice,
        sockets: Vec<UdpSocket>,
        stats: Option<Vec<Arc<WorkerStats>>>,
    ) -> Result<Workers> {
        Workers::start(
            &self.cfg,
            self.engine,
            self.peers,
            device,
            sockets,
            self.cpus.clone(),
            self.offload,
            self.wg,
            &self.events_tx,
            stats,
        )
    }

    /// Restarts `workers` on sockets bound to `port`: the new sockets'
    /// duplicates, or why nothing changed; and whether the tunnel goes on
    /// (false: the restart failed half way, or a stop signal came).
    fn rebind(
        &mut self,
        port: u16,
        workers: &mut Workers,
        events: &Receiver<Event>,
    ) -> (std::result::Result<Vec<UdpSocket>, String>, bool) {
        let Some(spare) = &self.spare else {
            return (Err("this tunnel's port is fixed".into()), true);
        };
        let mut cfg = self.cfg.clone();
        cfg.peers.listen.set_port(port);
        // Everything that can fail without harm first.
        let prepared = open_sockets(&cfg, self.offload).and_then(|sockets| {
            let dups = sockets
                .iter()
                .map(|s| {
                    s.try_clone()
                        .map_err(|e| Error::io("duplicate a UDP socket", e))
                })
                .collect::<Result<Vec<_>>>()?;
            Ok((sockets, dups, spare.try_clone()?))
        });
        let (sockets, dups, device) = match prepared {
            Ok(p) => p,
            Err(e) => return (Err(e.to_string()), true),
        };
        if let Err(e) = workers.stop_all(None) {
            crate::info!("restart: a worker stopped with an error: {e}");
        }
        self.cfg = cfg;
        let started = self
            .start(device, sockets, Some(workers.stats.clone()))
            .and_then(|w| {
                let ready = w.wait_ready(&self.cfg, events, self.peers);
                *workers = w;
                ready
            });
        match started {
            Ok(true) => {
                crate::info!(
                    "WireGuard listen port {port}: {} worker(s) restarted on new sockets",
                    workers.stats.len()
                );
                (Ok(dups), true)
            }
            Ok(false) => (Ok(dups), false),
            Err(e) => {
                crate::info!("restart on port {port} failed: {e}");
                (Err(e.to_string()), false)
            }
        }
    }
}

/// Serves the metrics from a thread of its own.
fn serve_metrics(
    listener: crate::metrics::Listener,
    sources: &Arc<Sources>,
    stop: &Arc<AtomicBool>,
) -> Result<thread::JoinHandle<()>> {
    let addr = listener.addr();
    let h = listener.serve(sources.clone(), stop.clone())?;
    crate::info!("metrics at http://{addr}/metrics");
    Ok(h)
}

/// Where packets go, for the "tunnel up" line.
fn describe_path(cfg: &TunnelConfig, peers: &SharedPeers) -> String {
    let (_, t) = peers.load();
    if cfg.mode.is_reflect() {
        "reflecting echo requests and UDP back into the device".to_string()
    } else if cfg.mode.is_wireguard() {
        format!(
            "wireguard udp {} -> {} peers by {} AllowedIPs",
            cfg.peers.listen,
            t.len(),
            t.prefixes()
        )
    } else if t.is_single() {
        format!("udp {} -> {}", cfg.peers.listen, t.peer(0).addr)
    } else {
        format!(
            "udp {} -> {} peers by {} prefixes",
            cfg.peers.listen,
            t.len(),
            t.prefixes()
        )
    }
}

/// Forwards until a stop signal or a worker's exit, reloading peers on
/// SIGHUP and reporting every `--stats-interval`.
fn run_until_stopped(
    cfg: &TunnelConfig,
    events: &Receiver<Event>,
    reload: &mut dyn FnMut(),
    reporter: &mut Reporter,
    mut rebind: impl FnMut(u16) -> (std::result::Result<Vec<UdpSocket>, String>, bool),
) {
    let ticker: Receiver<Instant> = if cfg.service.stats_interval_secs > 0 {
        channel::tick(Duration::from_secs(cfg.service.stats_interval_secs))
    } else {
        channel::never()
    };
    loop {
        channel::select! {
            recv(events) -> ev => match ev {
                Ok(Event::Signal(Signal::SIGHUP)) => reload(),
                Ok(Event::Signal(sig)) => {
                    crate::info!("{} received, stopping", sig.as_str());
                    return;
                }
                Ok(Event::Worker(WorkerEvent::Exited)) | Err(_) => return,
                Ok(Event::Worker(WorkerEvent::Ready(_))) => {}
                Ok(Event::Rebind(port, reply)) => {
                    let (result, go_on) = rebind(port);
                    let _ = reply.send(result);
                    if !go_on {
                        return;
                    }
                }
            },
            recv(ticker) -> _ => reporter.tick(),
        }
    }
}
