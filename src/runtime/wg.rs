//! WireGuard mode's part of the runtime: the configuration file (refused
//! if group or others may read it: it holds the private key), the peer
//! table of its peers, and the control thread that handles handshake
//! messages and the timers, sending what [`crate::wg::Device`] returns.

use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::config::{Mode, TunnelConfig};
use crate::error::{Error, Result};
use crate::peers::{PeerSpec, PeerTable, SharedPeers};
use crate::stats::WorkerStats;
use crate::wg::{Device, WgConf};

/// How often the control thread runs the peers' timers (handshake
/// retries, rekeys, keepalives, expiry; boringtun's resolution is finer
/// than WireGuard's, whose timers are seconds).
const TICK: Duration = Duration::from_millis(100);

/// A WireGuard tunnel's configuration as read at start.
pub(super) struct Loaded {
    pub(super) conf: WgConf,
    pub(super) table: PeerTable,
    /// The number of queues (`--queues auto`: no more than peers).
    queues: usize,
}

/// An `Endpoint`: an address (with an interface for a link-local one), or
/// a host name resolved now (its first address).
fn resolve(s: &str) -> std::result::Result<SocketAddr, String> {
    crate::platform::parse_endpoint(s)
        .or_else(|e| s.to_socket_addrs().ok().and_then(|mut a| a.next()).ok_or(e))
}

/// Reads the file of `cfg`'s WireGuard mode (None in other modes).
pub(super) fn load(cfg: &TunnelConfig) -> Result<Option<Loaded>> {
    let Mode::WireGuard { config, .. } = &cfg.mode else {
        return Ok(None);
    };
    // No file: an interface for `wg` to configure.
    let Some(config) = config else {
        let conf = WgConf::empty();
        let queues = queues(cfg, &conf);
        let table = table_for(&conf, queues, None).map_err(Error::config)?;
        return Ok(Some(Loaded {
            conf,
            table,
            queues,
        }));
    };
    let conf = read_file(config)?;
    let at = |e: String| Error::config(format!("WireGuard config {}: {e}", config.display()));
    let queues = queues(cfg, &conf);
    let table = table_for(&conf, queues, None).map_err(at)?;
    Ok(Some(Loaded {
        conf,
        table,
        queues,
    }))
}

/// The number of queues for `conf`: with `--queues auto`, no more than it
/// has peers (at least one); see [`TunnelConfig::queues_per_peer`].
///
/// [`TunnelConfig::queues_per_peer`]: crate::config::TunnelConfig::queues_per_peer
fn queues(cfg: &TunnelConfig, conf: &WgConf) -> usize {
    if cfg.queues_per_peer() {
        cfg.engine.queues.min(conf.peers.len()).max(1)
    } else {
        cfg.engine.queues
    }
}

/// Reads and checks the WireGuard file at `config`.
fn read_file(config: &Path) -> Result<WgConf> {
    let at = |e: String| Error::config(format!("WireGuard config {}: {e}", config.display()));
    let text = read_private(config)?;
    let conf = crate::wg::conf::parse(&text, resolve).map_err(at)?;
    if conf.peers.is_empty() {
        return Err(at("no [Peer]: nobody could connect".into()));
    }
    // Each prefix belongs to one peer (wg would move it to the later one;
    // tunfwd says so instead).
    let mut owner = std::collections::HashMap::new();
    for p in &conf.peers {
        for prefix in &p.allowed_ips {
            if let Some(line) = owner.insert(*prefix, p.line) {
                return Err(at(format!(
                    "AllowedIPs {prefix} of the [Peer] at line {} is already the [Peer]'s at line {line}",
                    p.line
                )));
            }
        }
    }
    Ok(conf)
}

/// SIGHUP with WireGuard: the file read again and applied as `wg
/// syncconf` would (peers left alone keep their sessions; endpoints the
/// file gives are set), or nothing changed and one line says why.
pub(super) fn reload(wg: &Wg, cfg: &TunnelConfig) {
    let Mode::WireGuard {
        config: Some(path),
        listen_from_file,
    } = &cfg.mode
    else {
        crate::info!("SIGHUP: no WireGuard file (wg configures this tunnel); nothing reloaded");
        return;
    };
    let read = read_file(path).map(|mut conf| {
        // --listen, not the file, names the port.
        if !listen_from_file {
            conf.listen_port = None;
        }
        conf
    });
    match read.and_then(|conf| wg.state.sync(conf).map_err(Error::config)) {
        Ok(peers) => crate::info!(
            "WireGuard config reloaded from {}: {peers} peers",
            path.display()
        ),
        Err(e) => crate::info!("WireGuard reload refused, nothing changed: {e}"),
    }
}

/// The peer table of `conf`'s peers, in order (peer `i` is `PeerId` i,
/// as in the device's set), named by public key, with counters for
/// `workers` workers; a peer in `old` keeps its counters.
pub(super) fn table_for(
    conf: &WgConf,
    workers: usize,
    old: Option<&PeerTable>,
) -> std::result::Result<PeerTable, String> {
    let unspecified = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0));
    let specs: Vec<PeerSpec> = conf
        .peers
        .iter()
        .map(|p| PeerSpec {
            addr: p.endpoint.unwrap_or(unspecified),
            prefixes: p.allowed_ips.clone(),
        })
        .collect();
    let names: Vec<String> = conf
        .peers
        .iter()
        .map(|p| p.public_key.to_string())
        .collect();
    PeerTable::build_keyed(&specs, &names, workers, old).map_err(|e| e.to_string())
}

/// Makes `conf` the device's configuration: its peer set and the table
/// routing to it, published together (every worker takes both at its
/// next visit; sessions of peers left alone go on).
pub(super) fn publish(
    dev: &Device,
    conf: &WgConf,
    endpoint_set: impl Fn(&crate::wg::PublicKey) -> bool,
    shared: &SharedPeers,
    workers: usize,
) -> std::result::Result<(), String> {
    let (_, old) = shared.load();
    let mut table = table_for(conf, workers, Some(&old))?;
    let set = dev.apply(conf, endpoint_set)?;
    table.attach(set);
    shared.store(Arc::new(table));
    Ok(())
}

/// The file's text, if only its owner may read it.
fn read_private(path: &Path) -> Result<String> {
    let what = || format!("read WireGuard config {}", path.display());
    let meta = std::fs::metadata(path).map_err(|e| Error::io(what(), e))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::config(format!(
            "WireGuard config {}: group or others may access it (mode {mode:03o}), and it holds \
             the private key: chmod 600 {}",
            path.display(),
            path.display()
        )));
    }
    std::fs::read_to_string(path).map_err(|e| Error::io(what(), e))
}

impl Loaded {
    /// `cfg` with the listening address the file gives (the wildcard
    /// address of both families on ListenPort, unless `--listen` was
    /// given) and the number of queues for its peers.
    pub(super) fn resolve(&self, cfg: &TunnelConfig) -> TunnelConfig {
        let mut c = cfg.clone();
        c.engine.queues = self.queues;
        if let Mode::WireGuard {
            listen_from_file: true,
            ..
        } = c.mode
        {
            c.peers.listen.set_port(self.conf.listen_port.unwrap_or(0));
        }
        c
    }
}

/// A WireGuard tunnel's running parts: the device every worker shares, a
/// socket for the control thread's sends, and what the userspace API
/// reads and changes.
pub(super) struct Wg {
    pub(super) dev: Arc<Device>,
    state: Arc<super::uapi::State>,
}

/// The WireGuard device for `conf` (None without WireGuard) on the
/// workers' `sockets` (each given the file's FwMark); its peer set is
/// published with the table in `shared`.
pub(super) fn device(
    conf: Option<&WgConf>,
    sockets: &[UdpSocket],
    shared: &Arc<SharedPeers>,
    cfg: &TunnelConfig,
    events: &crossbeam::channel::Sender<super::Event>,
) -> Result<Option<Wg>> {
    let workers = cfg.engine.queues;
    let (Some(conf), Some(first)) = (conf, sockets.first()) else {
        return Ok(None);
    };
    let local = first
        .local_addr()
        .map_err(|e| Error::io("query the UDP socket's address", e))?;
    let dup = |s: &UdpSocket| {
        s.try_clone()
            .map_err(|e| Error::io("duplicate the UDP socket for WireGuard", e))
    };
    let control = dup(first)?;
    let sockets = sockets.iter().map(dup).collect::<Result<Vec<_>>>()?;
    if let Some(m) = conf.fwmark {
        for s in &sockets {
            crate::platform::set_mark(s, m)
                .map_err(|e| Error::io(format!("set FwMark {m} on the UDP socket"), e))?;
        }
    }
    let mut dev = Device::new(conf).map_err(Error::config)?;
    dev.set_socket(local);
    publish(&dev, conf, |_| false, shared, workers).map_err(Error::config)?;
    let dev = Arc::new(dev);
    let state = Arc::new(super::uapi::State {
        dev: dev.clone(),
        shared: shared.clone(),
        workers,
        sockets: Mutex::new(sockets),
        control: Arc::new(Mutex::new(control)),
        port: Mutex::new(local.port()),
        conf: Mutex::new(conf.clone()),
        events: events.clone(),
    });
    Ok(Some(Wg { dev, state }))
}

/// Serves WireGuard's userspace API for interface `iface`, if there is a
/// WireGuard device; required (an error if it cannot be served) when no
/// file configures the tunnel.
pub(super) fn serve(
    wg: Option<&Wg>,
    iface: &str,
    cfg: &TunnelConfig,
) -> Result<Option<super::uapi::Server>> {
    let Some(w) = wg else {
        return Ok(None);
    };
    let required = matches!(cfg.mode, Mode::WireGuard { config: None, .. });
    let server = super::uapi::serve(iface, w.state.clone(), required)?;
    if let Some(s) = &server {
        crate::info!("WireGuard API (wg): {}", s.path().display());
    }
    Ok(server)
}

/// Starts the control thread of `wg`, if there is one, counting into
/// `stats` until `stop`.
pub(super) fn control(
    wg: Option<&Wg>,
    stats: &Arc<WorkerStats>,
    stop: &Arc<AtomicBool>,
) -> Result<Option<thread::JoinHandle<()>>> {
    wg.map(|w| {
        spawn_control(
            w.dev.clone(),
            w.state.control.clone(),
            stats.clone(),
            stop.clone(),
        )
    })
    .transpose()
}

/// Runs the control thread until `stop`: handshake messages the workers
/// queued, and the timers every [`TICK`]; what they return is sent on
/// `socket` (a clone of the first worker's, replaced when the workers
/// move to another port), counted in `stats`.
fn spawn_control(
    dev: Arc<Device>,
    socket: Arc<Mutex<UdpSocket>>,
    stats: Arc<WorkerStats>,
    stop: Arc<AtomicBool>,
) -> Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name("tunfwd-wg".into())
        .spawn(move || {
            // Room for any message: packets that waited for a handshake
            // are sealed here too.
            let mut out = vec![0u8; 65536 + 64];
            let send = |d: &[u8], to: SocketAddr| match socket
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .send_to(d, to)
            {
                Ok(_) => {
                    stats.wg_control_sent.add(1);
                    if d.len() == crate::wg::device::COOKIE_REPLY_LEN {
                        stats.wg_cookie_replies.add(1);
                    }
                }
                Err(_) => stats.tun_to_peer.drop(crate::types::DropReason::SendFailed),
            };
            let mut next = Instant::now() + TICK;
            while !stop.load(Ordering::Relaxed) {
                let wait = next.saturating_duration_since(Instant::now());
                match dev.handshakes().recv_timeout(wait) {
                    Ok(msg) => {
                        if let Some(r) = dev.handle_handshake(&msg, &mut out, send) {
                            stats.peer_to_tun.drop(r);
                        }
                    }
                    Err(crossbeam::channel::RecvTimeoutError::Timeout) => {}
                    Err(crossbeam::channel::RecvTimeoutError::Disconnected) => return,
                }
                if Instant::now() >= next {
                    dev.tick(&mut out, send);
                    next = Instant::now() + TICK;
                }
            }
        })
        .map_err(|e| Error::io("spawn the WireGuard control thread", e))
}
