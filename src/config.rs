//! Validated configuration: what the CLI parsed, checked for consistency
//! before anything touches the OS.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::types::{Cidr, Prefix, UserSpec};

/// Smallest MTU: the IPv4 minimum (RFC 791).
pub const MIN_MTU: u32 = 68;
/// IPv6 needs at least 1280 (RFC 8200).
pub const MIN_MTU_IPV6: u32 = 1280;
/// Largest MTU: the largest UDP payload over IPv4 (65535 - 20 - 8).
pub const MAX_MTU: u32 = 65507;
/// Default MTU: a 1500-byte underlay minus an IPv6 + UDP header (48 bytes).
pub const DEFAULT_MTU: u32 = 1452;
/// Default MTU with WireGuard: also its 32 bytes (header and tag), as
/// wg-quick's default for a 1500-byte underlay.
pub const DEFAULT_MTU_WIREGUARD: u32 = 1420;
/// Default transmit queue length set on devices tunfwd creates: larger than
/// the kernel's 500, which drops bursts.
pub const DEFAULT_TXQUEUELEN: u32 = 1000;
/// The same with flow queueing (`--aqm fq-codel`, TUN mode): tunfwd reads
/// the device promptly and keeps the standing queue itself, so its FIFO
/// ring only has to absorb bursts; a shorter ring is a shorter wait for a
/// packet read behind an overload (README, Performance).
pub const DEFAULT_TXQUEUELEN_FQ: u32 = 256;
/// Default `--aqm-inflight-bytes`: one 64 KiB super-packet. Against four
/// (3 runs, medians): io_uring ping under one TCP stream p50 1,058 -> 766
/// us, under four 2,753 -> 2,189 us, TCP x1 9.63 -> 10.76 Gbit/s; poll (whose
/// sends are synchronous) unchanged (README, Performance).
pub const DEFAULT_AQM_INFLIGHT_BYTES: usize = 64 * 1024;
/// Bounds of `--aqm-inflight-bytes`.
pub const AQM_INFLIGHT_BYTES: std::ops::RangeInclusive<usize> = 1500..=64 << 20;
/// Default packets handled per direction per wakeup.
pub const DEFAULT_BATCH: usize = 64;
/// Default UDP send and receive buffer of a tunnel's sockets: room for the
/// bursts offload makes (a GRO batch or GSO send is up to 64 KiB, and a
/// worker that was not scheduled for a while meets many of them). Chosen
/// from `tunfwd bench`: below 2 MiB a single TCP stream loses segments at
/// the receiving socket; 4 MiB removed those losses for one and four
/// streams (README, Performance).
pub const DEFAULT_SOCKET_BUFFER_BYTES: usize = 4 << 20;
/// Upper bound on `--batch`: a loop iteration's work stays bounded.
pub const MAX_BATCH: usize = 4096;
/// Default bytes one visit to a direction may take: four 64 KiB
/// super-packets (offload), or a whole `--batch` of MTU-sized packets
/// without offload (README, Performance).
pub const DEFAULT_VISIT_BYTES: usize = 256 << 10;
/// Packets a worker moves after a wakeup before it drops back from
/// `--wake-nice` (NAPI's budget).
pub const DEFAULT_WAKE_BUDGET: u64 = 64;
/// `--spin` with io_uring, in microseconds: three runs of `tunfwd bench
/// --compare vxlan,uring,uring+spin=100,uring+spin=300,...` (README,
/// Performance) kept single-stream TCP at 0.97x and cut the loaded ping's
/// median by a third and its p99 by half; the poll engine gained nothing
/// under load from it and does not spin by default.
pub const DEFAULT_SPIN_US_URING: u64 = 100;
/// Upper bound on `--visit-bytes`.
pub const MAX_VISIT_BYTES: usize = 64 << 20;
/// Upper bound on `--txqueuelen`.
pub const MAX_TXQUEUELEN: u32 = 1_000_000;
/// Upper bound on `--queues`.
pub const MAX_QUEUES: usize = 256;

/// How stats lines and the summary are printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StatsFormat {
    /// `tunfwd: stats ... key=value ...` lines.
    #[default]
    Text,
    /// One JSON object per interval and one for the summary, a line each.
    Json,
}

/// Peers shown in the stats lines and the summary by default.
pub const DEFAULT_STATS_PEERS: usize = 10;

/// Which engine moves the packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineKind {
    /// io_uring where the kernel allows, else poll (with a log line).
    Auto,
    /// `poll(2)` over nonblocking descriptors; runs everywhere.
    Poll,
    /// io_uring (Linux); fails if unavailable.
    Uring,
}

/// A feature switch: on (required), off, or chosen by probing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Toggle {
    On,
    Off,
    Auto,
}

/// Where worker threads run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CpuPlan {
    /// Worker i on the i-th CPU this process may use (wrapping around).
    Spread,
    /// No pinning.
    None,
    /// Worker i on the i-th CPU of the list (wrapping around).
    List(Vec<usize>),
}

impl FromStr for CpuPlan {
    type Err = String;

    /// `auto`, `none`, or a list like `0,2-3`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => return Ok(CpuPlan::Spread),
            "none" => return Ok(CpuPlan::None),
            _ => {}
        }
        let mut cpus = Vec::new();
        for part in s.split(',') {
            let bad = || format!("{part:?} is not a CPU number or range (e.g. 0,2-3)");
            match part.split_once('-') {
                Some((a, b)) => {
                    let a: usize = a.trim().parse().map_err(|_| bad())?;
                    let b: usize = b.trim().parse().map_err(|_| bad())?;
                    if a > b || b >= 4096 {
                        return Err(bad());
                    }
                    cpus.extend(a..=b);
                }
                None => {
                    let c: usize = part.trim().parse().map_err(|_| bad())?;
                    if c >= 4096 {
                        return Err(bad());
                    }
                    cpus.push(c);
                }
            }
        }
        Ok(CpuPlan::List(cpus))
    }
}

/// `--queues`: a number, or `auto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueCount {
    /// One queue per CPU the workers may use, up to [`MAX_AUTO_QUEUES`]
    /// (and in WireGuard mode the number of peers), where the ends need
    /// not agree on the count (WireGuard, and plaintext TUN tunnels, whose
    /// queues then bind the one port); else (TAP) one. The runtime takes
    /// fewer where more would not work ([`EngineConfig::queues_auto`]).
    Auto,
    /// This many.
    Fixed(usize),
}

/// Upper bound on `--queues auto`: more workers than this cost memory
/// (each its buffers and socket) for flows that one peer's port keeps on
/// one worker anyway.
pub const MAX_AUTO_QUEUES: usize = 8;

impl FromStr for QueueCount {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "auto" {
            return Ok(QueueCount::Auto);
        }
        s.parse()
            .map(QueueCount::Fixed)
            .map_err(|_| format!("{s:?} is not a number of queues or `auto`"))
    }
}

impl QueueCount {
    /// The number of queues: `shared_port` says whether the queues may
    /// share one UDP port so that the peer need not run as many;
    /// `cpus` is how many CPUs the workers may use (0: unknown).
    pub fn resolve(self, shared_port: bool, cpus: usize) -> usize {
        match self {
            QueueCount::Fixed(n) => n,
            QueueCount::Auto if shared_port => cpus.clamp(1, MAX_AUTO_QUEUES),
            QueueCount::Auto => 1,
        }
    }
}

/// io_uring flags as given; `None` means the default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UringFlags {
    pub ring_entries: Option<u32>,
    pub buffers: Option<u32>,
    pub inflight: Option<u32>,
    pub multishot: Option<Toggle>,
    pub fixed_buffers: Option<Toggle>,
    pub sqpoll_idle_ms: Option<u32>,
    pub sqpoll_cpu: Option<u32>,
}

pub const DEFAULT_RING_ENTRIES: u32 = 256;
pub const DEFAULT_BUFFERS: u32 = 512;
/// With offload each buffer holds a 64 KiB super-packet: fewer of them.
pub const DEFAULT_BUFFERS_OFFLOAD: u32 = 64;
pub const DEFAULT_INFLIGHT: u32 = 2;

impl UringFlags {
    /// Names of the flags that were given, for "only with --engine uring".
    pub(crate) fn given(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.ring_entries.is_some() {
            v.push("--ring-entries");
        }
        if self.buffers.is_some() {
            v.push("--buffers");
        }
        if self.inflight.is_some() {
            v.push("--inflight");
        }
        if self.multishot.is_some() {
            v.push("--multishot");
        }
        if self.fixed_buffers.is_some() {
            v.push("--fixed-buffers");
        }
        if self.sqpoll_idle_ms.is_some() {
            v.push("--sqpoll");
        }
        if self.sqpoll_cpu.is_some() {
            v.push("--sqpoll-cpu");
        }
        v
    }

    /// The one place io_uring's defaults are filled in and its flags
    /// checked, for workers with or without `offload` (whose buffers each
    /// hold a 64 KiB super-packet, so the default pool is smaller).
    /// Validation calls it without offload (the flags' own ranges); the
    /// probe again once it knows whether offload is on.
    pub fn resolve(&self, offload: bool) -> Result<UringSettings> {
        let ring_entries = self.ring_entries.unwrap_or(DEFAULT_RING_ENTRIES);
        if !(8..=32768).contains(&ring_entries) {
            return Err(Error::config(format!(
                "--ring-entries {ring_entries} is out of range 8..=32768"
            )));
        }
        let default_buffers = if offload {
            DEFAULT_BUFFERS_OFFLOAD
        } else {
            DEFAULT_BUFFERS
        };
        let buffers = self.buffers.unwrap_or(default_buffers);
        if !buffers.is_power_of_two() || !(2..=32768).contains(&buffers) {
            return Err(Error::config(format!(
                "--buffers {buffers} must be a power of two from 2 to 32768"
            )));
        }
        // Unless given, the default shrinks to fit a small pool.
        let inflight = self.inflight.unwrap_or(DEFAULT_INFLIGHT.min(buffers / 2));
        if inflight == 0 || inflight > buffers / 2 {
            let default = if self.buffers.is_none() && offload {
                ", the default with offload"
            } else {
                ""
            };
            return Err(Error::config(format!(
                "--inflight {inflight} is out of range 1..={} (half of --buffers {buffers}{default})",
                buffers / 2
            )));
        }
        if self.sqpoll_cpu.is_some() && self.sqpoll_idle_ms.is_none() {
            return Err(Error::config("--sqpoll-cpu needs --sqpoll"));
        }
        Ok(UringSettings {
            ring_entries,
            buffers,
            inflight,
            multishot: self.multishot.unwrap_or(Toggle::Auto),
            fixed_buffers: self.fixed_buffers.unwrap_or(Toggle::Auto),
            sqpoll_idle_ms: self.sqpoll_idle_ms,
            sqpoll_cpu: self.sqpoll_cpu,
        })
    }
}

/// io_uring's settings with every default filled in
/// ([`UringFlags::resolve`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UringSettings {
    /// Submission queue entries (the completion queue gets 4x).
    pub ring_entries: u32,
    /// Buffers per worker (half for each direction; a power of two).
    pub buffers: u32,
    /// Single-shot reads kept outstanding per descriptor (without multishot).
    pub inflight: u32,
    pub multishot: Toggle,
    pub fixed_buffers: Toggle,
    /// Kernel submission-polling thread with this idle time in ms.
    pub sqpoll_idle_ms: Option<u32>,
    pub sqpoll_cpu: Option<u32>,
}

/// Everything `tunfwd tunnel` (or `reflect`) needs, in parts that each
/// check themselves ([`TunnelConfig::validate`]).
#[derive(Clone, Debug)]
pub struct TunnelConfig {
    /// What moves: IP packets, Ethernet frames in VXLAN, or reflected
    /// packets; with the options that only make sense for that mode.
    pub mode: Mode,
    pub device: DeviceConfig,
    pub peers: PeersConfig,
    pub engine: EngineConfig,
    pub queueing: QueueingConfig,
    pub service: ServiceConfig,
}

/// The TUN or TAP device.
#[derive(Clone, Debug)]
pub struct DeviceConfig {
    /// Interface name or a `%d` template.
    pub dev: String,
    /// Fail unless the device already exists.
    pub attach: bool,
    pub addresses: Vec<Cidr>,
    pub mtu: u32,
    /// `None`: leave the device's txqueuelen alone.
    pub txqueuelen: Option<u32>,
}

/// The UDP side: where tunfwd listens and whom it talks to.
#[derive(Clone, Debug)]
pub struct PeersConfig {
    pub listen: SocketAddr,
    /// `--peer`: the peers given on the command line (empty for a
    /// reflector); one without prefixes is a point-to-point tunnel.
    pub list: Vec<crate::peers::PeerSpec>,
    /// `--peers-file`: more peers, read at start and on SIGHUP.
    pub file: Option<std::path::PathBuf>,
}

/// How packets are moved: the engine, its workers and their sockets.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub kind: EngineKind,
    pub queues: usize,
    /// `--share-port` (plaintext TUN tunnels): every queue binds the one
    /// port (`SO_REUSEPORT`) and the kernel hands each datagram to the
    /// worker of its inner flow, so the ends need not agree on the count
    /// (without it queue i uses port + i).
    pub queues_share_port: bool,
    /// `--queues auto`: the runtime lowers `queues` where more would not
    /// work here (an existing device made without multi_queue takes one;
    /// io_uring rings must fit the locked-memory limit), with one line.
    pub queues_auto: bool,
    pub batch: usize,
    /// Bytes one visit to a direction may take (0: no byte bound).
    pub visit_bytes: usize,
    pub cpus: CpuPlan,
    /// Spin instead of sleeping while waiting for packets.
    pub busy_poll: bool,
    /// The nice value workers sleep at (0: off) and the packets a worker
    /// moves after a wakeup before dropping back to its own priority.
    pub wake_nice: i32,
    pub wake_budget: u64,
    /// Microseconds a worker keeps looking for packets after moving some
    /// before it sleeps (0: off; None: the engine's default).
    pub spin_us: Option<u64>,
    /// UDP socket buffer sizes in bytes (None: the kernel default).
    pub sndbuf: Option<usize>,
    pub rcvbuf: Option<usize>,
    pub uring: UringFlags,
    /// TSO/USO on the TUN device, UDP GSO/GRO on the socket.
    pub offload: Toggle,
}

/// Queue management.
#[derive(Clone, Debug)]
pub struct QueueingConfig {
    /// CoDel's parameters (`--aqm fq-codel` or `codel`); None: off.
    pub aqm: Option<crate::aqm::CodelParams>,
    /// `--aqm fq-codel`: TUN reads also go through flow queues with CoDel
    /// per flow (TUN mode); else CoDel acts on datagrams from the peer only.
    pub flow_queues: bool,
    /// Bytes each side's flow queues hand out that may be unfinished at
    /// once (`--aqm-inflight-bytes`).
    pub inflight_bytes: usize,
}

/// What runs around the datapath: reporting, the namespace, privileges.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    /// Peers shown in the stats lines and the summary (the most traffic
    /// first).
    pub stats_peers: usize,
    /// `key=value` lines, or one JSON object per line.
    pub stats_format: StatsFormat,
    /// `--metrics`: serve Prometheus metrics on this TCP address.
    pub metrics: Option<SocketAddr>,
    /// 0: no periodic stats line.
    pub stats_interval_secs: u64,
    /// Enter this network namespace before any setup.
    pub netns: Option<std::path::PathBuf>,
    /// Stop (as on SIGTERM) when the parent process dies.
    pub exit_with_parent: bool,
    /// Drop to this user (and group) once devices and sockets are set up.
    pub user: Option<UserSpec>,
}

/// The ways tunfwd runs. Options that belong to one mode live in its
/// variant, so a combination that makes no sense cannot be written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `tunfwd tunnel --mode tun`: IP packets on a TUN device, one per UDP
    /// datagram.
    Tun {
        /// Inner source prefixes accepted from the peer; empty: any.
        allowed_src: Vec<Prefix>,
    },
    /// `tunfwd tunnel --mode tap`: Ethernet frames on a TAP device, carried
    /// in VXLAN (RFC 7348) with this network identifier.
    Tap {
        vni: u32,
        /// Ethernet address for the device (None: the kernel's random one).
        mac: Option<[u8; 6]>,
    },
    /// `tunfwd reflect`: answer echo requests and UDP on the device; nothing
    /// goes to the network.
    Reflect,
    /// `tunfwd tunnel --wg-config FILE` (or `--wireguard`): IP packets on
    /// a TUN device, sealed in WireGuard messages for the peers of the file
    /// (the format `wg setconf` reads), which the runtime reads at start;
    /// without a file, an interface with no key and no peers that `wg`
    /// configures through the userspace API.
    WireGuard {
        config: Option<std::path::PathBuf>,
        /// No `--listen` was given: bind the wildcard address (both
        /// families) on the file's ListenPort.
        listen_from_file: bool,
    },
}

impl Mode {
    pub fn is_tap(&self) -> bool {
        matches!(self, Mode::Tap { .. })
    }

    pub fn is_reflect(&self) -> bool {
        matches!(self, Mode::Reflect)
    }

    pub fn is_wireguard(&self) -> bool {
        matches!(self, Mode::WireGuard { .. })
    }

    /// True if the mode moves IP packets between the device and peers (so
    /// flow queueing, CoDel and ECN apply).
    pub fn tunnels_ip(&self) -> bool {
        matches!(self, Mode::Tun { .. } | Mode::WireGuard { .. })
    }

    /// How the mode carries packets (a reflector sends none; its packets
    /// are IP).
    pub fn encap(&self) -> crate::encap::Encap {
        match self {
            Mode::Tun { .. } | Mode::Reflect => crate::encap::Encap::Ip,
            Mode::Tap { vni, .. } => crate::encap::Encap::Vxlan { vni: *vni },
            Mode::WireGuard { .. } => crate::encap::Encap::WireGuard,
        }
    }
}

impl TunnelConfig {
    /// True if TUN reads (and receives) go through flow queues.
    pub fn flow_queueing(&self) -> bool {
        self.queueing.flow_queues && self.queueing.aqm.is_some() && self.mode.tunnels_ip()
    }

    /// The transmit queue length for a device tunfwd created: the flag,
    /// else the default for the queue management in use.
    pub fn created_txqueuelen(&self) -> u32 {
        self.device.txqueuelen.unwrap_or(if self.flow_queueing() {
            DEFAULT_TXQUEUELEN_FQ
        } else {
            DEFAULT_TXQUEUELEN
        })
    }

    /// Checks the configuration: each part checks itself (the mode, the
    /// device, the engine, queue management, the peers given the mode and
    /// queues, the service given the engine), then what this platform
    /// lacks. Called once before setup.
    pub fn validate(&self) -> Result<()> {
        self.mode.validate(self.engine.offload)?;
        self.device.validate()?;
        self.engine.validate()?;
        self.queueing.validate()?;
        self.peers.validate(&self.mode, self.port_queues())?;
        self.service.validate(&self.engine)?;
        if !cfg!(target_os = "linux") {
            if let Some(flag) = self.linux_only_flags().first() {
                return Err(Error::config(format!(
                    "{flag} needs Linux; on this system tunfwd runs the poll engine on one \
                     utun device"
                )));
            }
        }
        Ok(())
    }

    /// The options given that only Linux implements (io_uring, multi-queue,
    /// offload, TAP, namespaces, pinning).
    pub fn linux_only_flags(&self) -> Vec<&'static str> {
        let mut flags = Vec::new();
        let mut check = |given: bool, flag: &'static str| {
            if given {
                flags.push(flag);
            }
        };
        let (d, e, s) = (&self.device, &self.engine, &self.service);
        check(e.kind == EngineKind::Uring, "--engine uring");
        check(e.queues > 1, "--queues above 1");
        check(d.attach, "--attach");
        check(d.txqueuelen.is_some(), "--txqueuelen");
        check(s.netns.is_some(), "--netns");
        check(s.exit_with_parent, "--exit-with-parent");
        check(matches!(e.cpus, CpuPlan::List(_)), "--cpus LIST");
        check(e.offload == Toggle::On, "--offload on");
        check(self.mode.is_tap(), "--mode tap");
        check(matches!(self.mode, Mode::Tap { mac: Some(_), .. }), "--mac");
        check(s.user.is_some(), "--user");
        flags.extend(e.uring.given());
        flags
    }

    /// The offload setting in effect: reflected packets go back as they came
    /// and TAP frames travel in VXLAN, so neither carries virtio-net headers.
    pub fn effective_offload(&self) -> Toggle {
        // Virtio-net headers on the device are Linux-only.
        if !cfg!(target_os = "linux") || !self.mode.tunnels_ip() {
            Toggle::Off
        } else {
            self.engine.offload
        }
    }

    /// Local UDP address of worker `queue`: one port per queue, or with
    /// WireGuard (whose peers know one port) the same port for every queue
    /// ([`TunnelConfig::shares_port`]).
    pub fn listen_for(&self, queue: usize) -> SocketAddr {
        if self.shares_port() {
            self.peers.listen
        } else {
            offset_port(self.peers.listen, queue)
        }
    }

    /// `--queues auto` in WireGuard mode: `queues` is the bound the CPUs
    /// set, and the runtime lowers it to the number of peers its file
    /// names (one without a file), since a peer's packets are sealed under
    /// its lock and arrive at one worker: more queues than peers add
    /// contention, not speed.
    pub fn queues_per_peer(&self) -> bool {
        self.engine.queues_auto && self.mode.is_wireguard()
    }

    /// True if every worker binds the one listening port (`SO_REUSEPORT`,
    /// the kernel spreading datagrams by flow): WireGuard with several
    /// queues, and a plaintext tunnel's `--share-port` with several
    /// ([`EngineConfig::queues_share_port`]).
    pub fn shares_port(&self) -> bool {
        self.engine.queues > 1 && (self.mode.is_wireguard() || self.engine.queues_share_port)
    }

    /// True if a plaintext tunnel's shared port picks each datagram's
    /// worker by its inner flow (classic BPF on the socket group).
    pub fn steers_by_inner_flow(&self) -> bool {
        self.shares_port() && !self.mode.is_wireguard()
    }

    /// How many UDP ports the queues use: one each, or one in all.
    pub fn port_queues(&self) -> usize {
        if self.shares_port() {
            1
        } else {
            self.engine.queues
        }
    }

    /// Every peer: the `--peer` flags, then the lines of the `--peers-file`
    /// whose text is `text` (read by the caller: this module does no I/O),
    /// each checked ([`PeersConfig::check_peer`]); `endpoint` parses an
    /// `ADDR:PORT`. Errors name the flag, or the file and line.
    pub fn peers_with_file(
        &self,
        text: Option<&str>,
        endpoint: impl Fn(&str) -> std::result::Result<SocketAddr, String>,
    ) -> Result<Vec<crate::peers::PeerSpec>> {
        let peers = &self.peers;
        let mut all = peers.list.clone();
        let (Some(path), Some(text)) = (&peers.file, text) else {
            return Ok(all);
        };
        let file = crate::peers::parse_peers_file(text, endpoint)
            .map_err(|e| Error::config(format!("peers file {}: {e}", path.display())))?;
        for (line, p) in file.iter().enumerate() {
            peers.check_peer(p, self.port_queues()).map_err(|e| {
                // The line of the n-th peer (comments and blanks skipped).
                let n = nth_peer_line(text, line);
                Error::config(format!("peers file {} line {n}: peer {e}", path.display()))
            })?;
        }
        all.extend(file);
        Ok(all)
    }

    /// Where the peer at `index` of [`TunnelConfig::peers_with_file`]'s list
    /// came from: `--peer ADDR` or `peers file F line L` (`text`: the
    /// file's).
    pub fn peer_origin(&self, index: usize, text: Option<&str>) -> String {
        let peers = &self.peers;
        if let Some(p) = peers.list.get(index) {
            return format!("--peer {p}");
        }
        match (&peers.file, text) {
            (Some(path), Some(text)) => format!(
                "peers file {} line {}",
                path.display(),
                nth_peer_line(text, index - peers.list.len())
            ),
            _ => format!("peer {}", index + 1),
        }
    }
}

impl Mode {
    /// TAP's VNI, and what TAP cannot do.
    fn validate(&self, offload: Toggle) -> Result<()> {
        if let Mode::Tap { vni, .. } = *self {
            if vni > crate::packet::vxlan::MAX_VNI {
                return Err(Error::config(format!(
                    "--vni {vni} is out of range 0..={}",
                    crate::packet::vxlan::MAX_VNI
                )));
            }
            if offload == Toggle::On {
                return Err(Error::config("--offload on: not available in TAP mode"));
            }
        }
        Ok(())
    }
}

impl DeviceConfig {
    /// MTU, addresses, transmit queue, the device's name.
    fn validate(&self) -> Result<()> {
        if !(MIN_MTU..=MAX_MTU).contains(&self.mtu) {
            return Err(Error::config(format!(
                "MTU {} is out of range {MIN_MTU}..={MAX_MTU} bytes",
                self.mtu
            )));
        }
        if self.addresses.iter().any(|c| c.addr.is_ipv6()) && self.mtu < MIN_MTU_IPV6 {
            return Err(Error::config(format!(
                "MTU {} is below {MIN_MTU_IPV6}, the IPv6 minimum, but an IPv6 address was given",
                self.mtu
            )));
        }
        if self.addresses.iter().filter(|c| c.addr.is_ipv4()).count() > 1 {
            return Err(Error::config(
                "at most one IPv4 --address may be given (any number of IPv6)",
            ));
        }
        if let Some(n) = self.txqueuelen {
            if !(1..=MAX_TXQUEUELEN).contains(&n) {
                return Err(Error::config(format!(
                    "--txqueuelen {n} is out of range 1..={MAX_TXQUEUELEN} packets"
                )));
            }
        }
        crate::device::check_name(&self.dev)?;
        Ok(())
    }
}

impl EngineConfig {
    /// Queues, batches, visits, CPUs, socket buffers, the engine's flags.
    fn validate(&self) -> Result<()> {
        if self.queues == 0 || self.queues > MAX_QUEUES {
            return Err(Error::config(format!(
                "--queues {} is out of range 1..={MAX_QUEUES}",
                self.queues
            )));
        }
        if !(1..=MAX_BATCH).contains(&self.batch) {
            return Err(Error::config(format!(
                "--batch {} is out of range 1..={MAX_BATCH} packets",
                self.batch
            )));
        }
        if self.visit_bytes > MAX_VISIT_BYTES {
            return Err(Error::config(format!(
                "--visit-bytes {} is out of range 0..={MAX_VISIT_BYTES}",
                self.visit_bytes
            )));
        }
        if let CpuPlan::List(list) = &self.cpus {
            if list.is_empty() {
                return Err(Error::config("--cpus needs at least one CPU"));
            }
        }
        if self.kind == EngineKind::Poll {
            if let Some(flag) = self.uring.given().first() {
                return Err(Error::config(format!(
                    "{flag} applies to the io_uring engine only, not --engine poll"
                )));
            }
        }
        self.uring.resolve(false)?;
        for (what, v) in [("--sndbuf", self.sndbuf), ("--rcvbuf", self.rcvbuf)] {
            if let Some(v) = v {
                if !(1024..=(1 << 30)).contains(&v) {
                    return Err(Error::config(format!(
                        "{what} {v} is out of range 1024..=1073741824 bytes"
                    )));
                }
            }
        }
        Ok(())
    }
}

impl ServiceConfig {
    /// What the service asks of the engine it runs: `--user` and SQPOLL
    /// exclude each other.
    fn validate(&self, engine: &EngineConfig) -> Result<()> {
        if self.user.is_some() && engine.uring.sqpoll_idle_ms.is_some() {
            return Err(Error::config(
                "--user with --sqpoll: the kernel's submission-polling thread keeps the \
                 privileges of the process that set up the ring; use one or the other",
            ));
        }
        Ok(())
    }
}

impl QueueingConfig {
    /// The flow queues' bytes in flight and CoDel's parameters.
    fn validate(&self) -> Result<()> {
        if !AQM_INFLIGHT_BYTES.contains(&self.inflight_bytes) {
            return Err(Error::config(format!(
                "--aqm-inflight-bytes {} is out of range {}..={} bytes",
                self.inflight_bytes,
                AQM_INFLIGHT_BYTES.start(),
                AQM_INFLIGHT_BYTES.end()
            )));
        }
        if let Some(p) = &self.aqm {
            if p.target.is_zero() || p.interval <= p.target || p.interval.as_secs() > 10 {
                return Err(Error::config(format!(
                    "--aqm-target-us {} and --aqm-interval-us {}: need 0 < target < interval <= 10 s",
                    p.target.as_micros(),
                    p.interval.as_micros()
                )));
            }
        }
        Ok(())
    }
}

impl PeersConfig {
    /// The listening address, the peers given by flag (for `mode`), and
    /// the ports of `queues` workers.
    fn validate(&self, mode: &Mode, queues: usize) -> Result<()> {
        if let SocketAddr::V6(a) = self.listen {
            if a.ip().is_unicast_link_local() && a.scope_id() == 0 {
                return Err(Error::config(format!(
                    "--listen {} is link-local: name its interface, e.g. [{}%eth0]:{}",
                    self.listen,
                    a.ip(),
                    a.port()
                )));
            }
        }
        if mode.is_wireguard() {
            if !self.list.is_empty() || self.file.is_some() {
                return Err(Error::config(
                    "--wg-config names the peers ([Peer] sections): --peer and --peers-file do \
                     not apply",
                ));
            }
            return Ok(());
        }
        if !mode.is_reflect() && self.list.is_empty() && self.file.is_none() {
            return Err(Error::config(
                "no peer: give --peer ADDR:PORT (repeatable, with =CIDR,... prefixes for many \
                 peers) or --peers-file FILE",
            ));
        }
        for p in &self.list {
            self.check_peer(p, queues)
                .map_err(|e| Error::config(format!("--peer {e}")))?;
        }
        if self.list.len() > 1 || self.list.iter().any(|p| !p.prefixes.is_empty()) {
            check_hub(mode).map_err(Error::config)?;
        }
        if self.file.is_some() {
            check_hub(mode).map_err(|e| Error::config(format!("--peers-file: {e}")))?;
        }
        if queues > 1 && !mode.is_reflect() {
            let last = queues - 1;
            if self.listen.port() == 0 {
                return Err(Error::config(
                    "--queues above 1 needs a fixed --listen port (queue i uses port + i)",
                ));
            }
            if usize::from(self.listen.port()) + last > usize::from(u16::MAX) {
                return Err(Error::config(format!(
                    "--listen port {} + {last} (one port per queue) exceeds 65535",
                    self.listen.port()
                )));
            }
        }
        Ok(())
    }

    /// What makes one peer unusable with this tunnel's socket and `queues`
    /// workers (one port each): the error starts with the peer.
    pub fn check_peer(
        &self,
        p: &crate::peers::PeerSpec,
        queues: usize,
    ) -> std::result::Result<(), String> {
        let addr = p.addr;
        if let SocketAddr::V6(a) = addr {
            if a.ip().is_unicast_link_local() && a.scope_id() == 0 {
                return Err(format!(
                    "{addr} is link-local: name its interface, e.g. [{}%eth0]:{}",
                    a.ip(),
                    a.port()
                ));
            }
        }
        if let (SocketAddr::V6(l), SocketAddr::V4(_)) = (self.listen, addr) {
            if !l.ip().is_unspecified() && l.ip().to_ipv4_mapped().is_none() {
                return Err(format!(
                    "{addr} is IPv4 but --listen {} is a specific IPv6 address: listen on an \
                     IPv4 address or on [::]:PORT",
                    self.listen
                ));
            }
        }
        let broadcast = addr.ip() == IpAddr::from(std::net::Ipv4Addr::BROADCAST);
        if addr.ip().is_multicast() || broadcast {
            return Err(format!(
                "{addr} is a {} address: a peer is one host (a unicast address)",
                if broadcast { "broadcast" } else { "multicast" }
            ));
        }
        if addr.port() == 0 || addr.ip().is_unspecified() {
            return Err(format!(
                "{addr} needs a concrete address and a non-zero port"
            ));
        }
        if self.listen.is_ipv4() && addr.is_ipv6() {
            return Err(format!(
                "{addr} is IPv6 but --listen {} is IPv4: listen on [::]:PORT for an IPv6 peer",
                self.listen
            ));
        }
        let last = queues.saturating_sub(1);
        if usize::from(addr.port()) + last > usize::from(u16::MAX) {
            return Err(format!(
                "{addr}: port {} + {last} (one port per queue) exceeds 65535",
                addr.port()
            ));
        }
        Ok(())
    }
}

/// Many peers (or routing by prefixes) is for IP packets only, and
/// replaces `--allow-src`.
fn check_hub(mode: &Mode) -> std::result::Result<(), String> {
    match mode {
        Mode::Tun { allowed_src } if !allowed_src.is_empty() => Err(
            "--allow-src is for a single peer without prefixes: a peer's prefixes already \
             say which inner sources it may send from"
                .into(),
        ),
        Mode::Tun { .. } => Ok(()),
        Mode::Tap { .. } => Err(
            "--mode tap carries Ethernet frames to one peer: peers with prefixes \
             (or several peers) need --mode tun"
                .into(),
        ),
        Mode::Reflect => Err("a reflector has no peers".into()),
        Mode::WireGuard { .. } => Err("--wg-config names the peers".into()),
    }
}

/// The line number (from 1) of the `n`-th (from 0) peer line of a peers
/// file.
fn nth_peer_line(text: &str, n: usize) -> usize {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.split('#').next().unwrap_or("").trim().is_empty())
        .nth(n)
        .map_or(0, |(i, _)| i + 1)
}

fn offset_port(addr: SocketAddr, queue: usize) -> SocketAddr {
    // Port 0 (kernel-chosen) stays 0 for every queue.
    if queue == 0 || addr.port() == 0 {
        return addr;
    }
    // validate() guarantees the sum fits.
    let port = u16::try_from(usize::from(addr.port()) + queue).unwrap_or(u16::MAX);
    // Only the port changes: an IPv6 scope stays.
    let mut a = addr;
    a.set_port(port);
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> TunnelConfig {
        TunnelConfig {
            mode: Mode::Tun {
                allowed_src: Vec::new(),
            },
            device: DeviceConfig {
                dev: "tun0".into(),
                attach: false,
                addresses: vec!["198.19.0.1/24".parse().unwrap()],
                mtu: DEFAULT_MTU,
                txqueuelen: None,
            },
            peers: PeersConfig {
                listen: "198.18.0.1:5000".parse().unwrap(),
                list: vec!["198.18.0.2:5000".parse().unwrap()],
                file: None,
            },
            engine: EngineConfig {
                kind: EngineKind::Poll,
                queues: 1,
                queues_share_port: false,
                queues_auto: false,
                batch: DEFAULT_BATCH,
                visit_bytes: DEFAULT_VISIT_BYTES,
                cpus: CpuPlan::Spread,
                busy_poll: false,
                wake_nice: 0,
                wake_budget: DEFAULT_WAKE_BUDGET,
                spin_us: None,
                sndbuf: None,
                rcvbuf: None,
                uring: UringFlags::default(),
                offload: Toggle::Auto,
            },
            queueing: QueueingConfig {
                aqm: None,
                flow_queues: false,
                inflight_bytes: DEFAULT_AQM_INFLIGHT_BYTES,
            },
            service: ServiceConfig {
                stats_peers: DEFAULT_STATS_PEERS,
                stats_format: StatsFormat::Text,
                metrics: None,
                stats_interval_secs: 0,
                netns: None,
                exit_with_parent: false,
                user: None,
            },
        }
    }

    #[test]
    fn a_created_device_gets_a_short_ring_with_flow_queueing() {
        let mut c = base();
        assert_eq!(c.created_txqueuelen(), DEFAULT_TXQUEUELEN);
        c.queueing.aqm = Some(crate::aqm::CodelParams::default());
        c.queueing.flow_queues = true;
        assert!(c.flow_queueing());
        assert_eq!(c.created_txqueuelen(), DEFAULT_TXQUEUELEN_FQ);
        c.device.txqueuelen = Some(4000);
        assert_eq!(c.created_txqueuelen(), 4000);
        c.device.txqueuelen = None;
        c.mode = Mode::Tap { vni: 1, mac: None };
        assert!(!c.flow_queueing(), "TAP frames are not flow-queued");
        assert_eq!(c.created_txqueuelen(), DEFAULT_TXQUEUELEN);
    }

    #[test]
    fn inflight_bytes_out_of_range_are_refused() {
        let err = |c: TunnelConfig| c.validate().unwrap_err().to_string();
        let mut c = base();
        c.queueing.inflight_bytes = 1499;
        assert!(err(c).contains("--aqm-inflight-bytes 1499 is out of range 1500..="));
        let mut c = base();
        c.queueing.inflight_bytes = (64 << 20) + 1;
        assert!(err(c).contains("--aqm-inflight-bytes"));
        let mut c = base();
        c.queueing.inflight_bytes = 1500;
        assert!(c.validate().is_ok());
    }

    #[test]
    fn sizes_and_combinations_are_refused_with_one_line() {
        let err = |c: TunnelConfig| c.validate().unwrap_err().to_string();
        let mut c = base();
        c.engine.batch = MAX_BATCH + 1;
        assert!(err(c).contains("--batch 4097 is out of range 1..=4096"));
        let mut c = base();
        c.engine.batch = 0;
        assert!(err(c).contains("--batch 0 is out of range"));
        let mut c = base();
        c.device.txqueuelen = Some(0);
        assert!(err(c).contains("--txqueuelen 0 is out of range"));
        let mut c = base();
        c.service.user = Some("nobody".parse().unwrap());
        c.engine.uring.sqpoll_idle_ms = Some(1000);
        c.engine.kind = EngineKind::Uring;
        assert!(err(c).contains("--user with --sqpoll"));
        let mut c = base();
        c.peers.listen = "[2001:db8::1]:5000".parse().unwrap();
        assert!(err(c).contains(
            "--peer 198.18.0.2:5000 is IPv4 but --listen [2001:db8::1]:5000 is a specific IPv6 address"
        ));
        let mut c = base();
        c.peers.listen = "[fe80::1%2]:5000".parse().unwrap();
        c.peers.list = vec!["[fe80::2]:5000".parse().unwrap()];
        assert!(err(c).contains("--peer [fe80::2]:5000 is link-local: name its interface"));
        // [::] (dual stack) with an IPv4 peer is fine.
        let mut c = base();
        c.peers.listen = "[::]:5000".parse().unwrap();
        assert!(c.validate().is_ok());
        let mut c = base();
        c.queueing.aqm = Some(crate::aqm::CodelParams {
            target: std::time::Duration::from_millis(20),
            interval: std::time::Duration::from_millis(10),
        });
        assert!(err(c).contains("need 0 < target < interval"));
    }

    #[test]
    fn linux_only_flags_are_listed() {
        assert!(base().linux_only_flags().is_empty());
        let mut c = base();
        c.engine.kind = EngineKind::Uring;
        c.engine.queues = 2;
        c.device.attach = true;
        c.device.txqueuelen = Some(10);
        c.engine.cpus = CpuPlan::List(vec![0]);
        c.engine.offload = Toggle::On;
        c.mode = Mode::Tap { vni: 1, mac: None };
        c.engine.uring.buffers = Some(8);
        assert_eq!(
            c.linux_only_flags(),
            [
                "--engine uring",
                "--queues above 1",
                "--attach",
                "--txqueuelen",
                "--cpus LIST",
                "--offload on",
                "--mode tap",
                "--buffers"
            ]
        );
        // Auto settings are not flags given: they resolve per platform.
        let mut auto = base();
        auto.engine.kind = EngineKind::Auto;
        auto.engine.offload = Toggle::Auto;
        assert!(auto.linux_only_flags().is_empty());
    }

    #[test]
    fn cpu_lists() {
        assert_eq!("auto".parse::<CpuPlan>().unwrap(), CpuPlan::Spread);
        assert_eq!("none".parse::<CpuPlan>().unwrap(), CpuPlan::None);
        assert_eq!(
            "0,2-4".parse::<CpuPlan>().unwrap(),
            CpuPlan::List(vec![0, 2, 3, 4])
        );
        for bad in ["", "x", "3-1", "1,,2", "99999"] {
            assert!(bad.parse::<CpuPlan>().is_err(), "{bad}");
        }
    }

    #[test]
    fn uring_flags_only_with_uring() {
        let mut c = base();
        c.engine.kind = EngineKind::Poll;
        c.engine.uring.buffers = Some(64);
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("--buffers applies")
        );
        c.engine.kind = EngineKind::Auto;
        c.validate().unwrap();
        c.engine.uring.buffers = Some(100);
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("power of two")
        );
        c.engine.uring.buffers = Some(64);
        c.engine.uring.inflight = Some(33);
        assert!(c.validate().is_err());
        c.engine.uring.inflight = None;
        // The smallest pool works with the default in-flight count.
        c.engine.uring.buffers = Some(2);
        c.validate().unwrap();
        c.engine.uring.buffers = None;
        c.engine.uring.sqpoll_cpu = Some(1);
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("needs --sqpoll")
        );
        c.engine.uring.sqpoll_cpu = None;
        c.engine.uring.ring_entries = Some(4);
        assert!(c.validate().is_err());
    }

    #[test]
    fn socket_buffer_bounds() {
        let mut c = base();
        c.engine.sndbuf = Some(10);
        assert!(c.validate().is_err());
        c.engine.sndbuf = Some(4 << 20);
        c.validate().unwrap();
    }

    #[test]
    fn cidr_parse() {
        let c: Cidr = "198.19.0.1/24".parse().unwrap();
        assert_eq!(c.prefix_len, 24);
        assert_eq!(c.to_string(), "198.19.0.1/24");
        let c: Cidr = "2001:db8:19::1/64".parse().unwrap();
        assert!(c.addr.is_ipv6());
        for bad in [
            "198.19.0.1",
            "198.19.0.1/33",
            "2001:db8::1/129",
            "198.19.0/24",
            "x/24",
            "198.19.0.1/-1",
            "198.19.0.1/",
            "0.0.0.0/0",
            "224.0.0.1/4",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn valid_base() {
        base().validate().unwrap();
    }

    #[test]
    fn mtu_range() {
        let mut c = base();
        c.device.mtu = 67;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("out of range")
        );
        c.device.mtu = 65508;
        assert!(c.validate().is_err());
        c.device.mtu = 68;
        c.validate().unwrap();
        c.device
            .addresses
            .push("2001:db8:19::1/64".parse().unwrap());
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("IPv6 minimum")
        );
    }

    #[test]
    fn one_ipv4_address() {
        let mut c = base();
        c.device.addresses.push("198.19.1.1/24".parse().unwrap());
        assert!(c.validate().is_err());
    }

    #[test]
    fn family_mismatch() {
        let mut c = base();
        c.peers.list = vec!["[2001:db8::2]:5000".parse().unwrap()];
        assert!(c.validate().is_err());
        c.peers.listen = "[::]:5000".parse().unwrap();
        c.validate().unwrap();
    }

    #[test]
    fn peer_must_be_concrete() {
        let mut c = base();
        c.peers.list = vec!["0.0.0.0:5000".parse().unwrap()];
        assert!(c.validate().is_err());
        c.peers.list = vec!["198.18.0.2:0".parse().unwrap()];
        assert!(c.validate().is_err());
    }

    #[test]
    fn per_queue_ports() {
        let mut c = base();
        c.engine.queues = 3;
        c.validate().unwrap();
        assert_eq!(c.listen_for(2).port(), 5002);
        c.peers.list = vec!["198.18.0.2:65534".parse().unwrap()];
        assert!(c.validate().is_err());
        c.peers.list = vec!["198.18.0.2:5000".parse().unwrap()];
        c.peers.listen = "198.18.0.1:0".parse().unwrap();
        assert!(c.validate().is_err());
    }

    #[test]
    fn queues_and_batch_bounds() {
        let mut c = base();
        c.engine.queues = 0;
        assert!(c.validate().is_err());
        c.engine.queues = 1;
        c.engine.batch = 0;
        assert!(c.validate().is_err());
    }

    #[test]
    fn bad_device_name() {
        let mut c = base();
        c.device.dev = "a/b".into();
        assert!(c.validate().is_err());
    }
}

#[cfg(test)]
mod prefix_tests {
    use super::*;

    #[test]
    fn prefix_contains() {
        let p: Prefix = "198.19.0.7/24".parse().unwrap();
        assert_eq!(p.to_string(), "198.19.0.0/24");
        assert!(p.contains("198.19.0.1".parse().unwrap()));
        assert!(p.contains("198.19.0.255".parse().unwrap()));
        assert!(!p.contains("198.19.1.1".parse().unwrap()));
        assert!(!p.contains("2001:db8::1".parse().unwrap()));
        let all: Prefix = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("203.0.113.9".parse().unwrap()));
        let host: Prefix = "198.19.0.2/32".parse().unwrap();
        assert!(host.contains("198.19.0.2".parse().unwrap()));
        assert!(!host.contains("198.19.0.3".parse().unwrap()));
        let v6: Prefix = "2001:db8:19::/48".parse().unwrap();
        assert!(v6.contains("2001:db8:19::2".parse().unwrap()));
        assert!(!v6.contains("2001:db8:20::2".parse().unwrap()));
        assert!(!v6.contains("198.19.0.2".parse().unwrap()));
        for bad in [
            "198.19.0.0",
            "198.19.0.0/33",
            "2001:db8::/129",
            "x/8",
            "1.2.3.4/-1",
        ] {
            assert!(bad.parse::<Prefix>().is_err(), "{bad}");
        }
    }

    #[test]
    fn user_spec() {
        let u: UserSpec = "nobody".parse().unwrap();
        assert_eq!((u.user.as_str(), u.group), ("nobody", None));
        let u: UserSpec = "65534:65534".parse().unwrap();
        assert_eq!(u.group.as_deref(), Some("65534"));
        for bad in ["", ":g", "u:"] {
            assert!(bad.parse::<UserSpec>().is_err(), "{bad:?}");
        }
    }
}
