//! Command line: parses arguments into a validated configuration and runs it.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

use crate::config::{self, EngineKind, TunnelConfig};
use crate::types::Cidr;

#[derive(Parser, Debug)]
#[command(
    name = "tunfwd",
    version,
    about = "Userspace IP tunnel: moves packets between a TUN device and a UDP peer",
    long_about = "Userspace IP tunnel: moves packets between a TUN device and a UDP peer.\n\
                  Wire format: one UDP datagram carries exactly one IPv4 or IPv6 packet, \
                  nothing added (the same as `socat TUN:... UDP:...`)."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the forwarder: create (or attach to) a TUN device, configure it,
    /// and forward its packets to --peer over UDP, and back.
    Tunnel(Box<TunnelArgs>),
    /// Print a shell completion script for bash, zsh or fish to stdout
    /// (e.g. `tunfwd completions bash > /etc/bash_completion.d/tunfwd`).
    Completions {
        #[arg(value_enum)]
        shell: ShellArg,
    },
    /// Print a man page (roff) to stdout, generated from these same
    /// definitions: tunfwd(1), or a subcommand's (tunfwd-tunnel(1), ...);
    /// with --out-dir, write every page there (tunfwd.1, tunfwd-tunnel.1,
    /// ...).
    Man {
        /// The subcommand whose page to print (tunnel, reflect, bench,
        /// completions).
        subcommand: Option<String>,
        /// Write all pages into this directory instead.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<std::path::PathBuf>,
    },
    /// Print the systemd unit template tunfwd@.service (one tunnel per
    /// /etc/tunfwd/NAME.toml, as a dynamic user with CAP_NET_ADMIN only),
    /// with ExecStart pointing at --exec or at this executable.
    SystemdUnit {
        /// The tunfwd executable the unit runs [default: this one].
        #[arg(long, value_name = "PATH")]
        exec: Option<std::path::PathBuf>,
    },
    /// Measure tunfwd against the bare veth underlay and the kernel's VXLAN
    /// tunnel in one run, on a two-namespace topology the bench builds and
    /// removes itself (needs root; Linux only).
    #[cfg(target_os = "linux")]
    Bench(BenchArgs),
    /// Answer ICMP/ICMPv6 echo requests and UDP datagrams that the kernel
    /// routes into a TUN device, back into it (a self-test and a latency far
    /// end: `ping` another address of the device's subnet).
    Reflect(Box<ReflectArgs>),
    /// Print a new WireGuard private key in base64, as `wg genkey` (the
    /// keys are interchangeable): `umask 077; tunfwd genkey > private.key`.
    Genkey,
    /// Read a WireGuard private key in base64 on standard input and print
    /// its public key, as `wg pubkey`: `tunfwd pubkey < private.key`.
    Pubkey,
}

/// `tunfwd completions SHELL`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum ShellArg {
    Bash,
    Zsh,
    Fish,
}

/// The device options shared by `tunnel` and `reflect`.
#[derive(clap::Args, Debug)]
struct DeviceArgs {
    /// TUN device name; a `%d` in it lets the kernel pick a number. On
    /// macOS: utun%d or utunN.
    #[arg(long, default_value = crate::device::DEFAULT_NAME, value_name = "NAME")]
    dev: String,

    /// Only attach to an existing (persistent) device; fail if it does not
    /// exist. Without it, an existing device is attached to and a missing one
    /// created. Attached devices are left in place on exit.
    #[arg(long)]
    attach: bool,

    /// Address and prefix length for the device, e.g. 198.19.0.1/24 or
    /// 2001:db8:19::1/64. Repeatable: at most one IPv4, any number of IPv6.
    #[arg(long = "address", value_name = "CIDR")]
    addresses: Vec<Cidr>,

    /// Device MTU in bytes: the largest inner IP packet. Range 68-65507
    /// (1280 or more with an IPv6 address). The default fits a 1500-byte
    /// underlay with an IPv6 outer header: 1452, or 1420 with --wg-config
    /// (WireGuard adds 32 bytes) [default: 1452].
    #[arg(long, value_name = "BYTES")]
    mtu: Option<u32>,

    /// Device transmit queue length in packets, 1-1000000. Default on a
    /// device tunfwd creates: 256 with --aqm fq-codel (tunfwd reads the
    /// device promptly and keeps the standing queue itself; the ring only
    /// absorbs bursts), else 1000 (the kernel's 500 drops bursts);
    /// unchanged on an attached one.
    #[arg(long, value_name = "PACKETS")]
    txqueuelen: Option<u32>,
}

/// The worker options shared by `tunnel` and `reflect`.
#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Forwarding engine.
    #[arg(long, value_enum, default_value = "auto")]
    engine: EngineArg,

    /// Number of TUN queues, one worker thread each (1-256), or `auto`.
    /// auto: one per CPU the workers may use (--cpus, else the process's
    /// CPU affinity), up to 8, every queue binding the one --listen port so
    /// the peer need not run as many (see --share-port); in WireGuard mode
    /// no more than the peers of --wg-config (1 without a file: one peer's
    /// packets are sealed under its lock and arrive at one worker, so
    /// queues beyond the peers only contend); in TAP mode 1. Fewer, with
    /// one line saying why, where an existing device was made without
    /// multi_queue (1) or io_uring's rings (about 44 KiB each by default)
    /// do not fit RLIMIT_MEMLOCK. A number N in a plaintext tunnel
    /// without --share-port: queue i binds PORT+i and talks to the peer's
    /// PORT+i, so both ends must be given the same N. Each queue
    /// costs a thread, a UDP socket (up to --sndbuf and --rcvbuf of kernel
    /// memory, 4 MiB each by default, taken as used) and resident memory:
    /// with io_uring about 8.5 MiB (4 MiB of it pinned packet buffers,
    /// --buffers), 2 MiB with --offload off; with poll under 1 MiB.
    #[arg(long, default_value = "auto", value_name = "N|auto")]
    queues: config::QueueCount,

    /// CPUs for the workers: `auto` (with two or more queues worker i on the
    /// i-th CPU this process may use; one worker is left to the scheduler),
    /// `none` (no pinning), or a list like `0,2-3`.
    #[arg(long, default_value = "auto", value_name = "LIST")]
    cpus: config::CpuPlan,

    /// Max packets handled per direction per wakeup, 1-4096.
    #[arg(long, default_value_t = config::DEFAULT_BATCH, value_name = "PACKETS")]
    batch: usize,

    /// Max bytes read or received per visit to one direction before the
    /// worker turns to the other (0: only --batch bounds a visit). Keeps
    /// one direction's 64 KiB super-packets from delaying the other's
    /// pings and ACKs.
    #[arg(long, default_value_t = config::DEFAULT_VISIT_BYTES, value_name = "BYTES")]
    visit_bytes: usize,

    /// Spin instead of sleeping while waiting for packets (burns a CPU per
    /// worker; lowers latency).
    #[arg(long)]
    busy_poll: bool,

    /// Nice value the workers sleep at, -20 to 0 (0: off, the default).
    /// Woken by a packet, a worker then runs ahead of bulk applications (on
    /// a kernel without preemption, at the next task switch) until it has
    /// moved --wake-budget packets since it woke, when it drops back to its
    /// own priority, so under sustained load the applications batch again.
    /// Needs CAP_SYS_NICE at start (tunfwd then raises RLIMIT_NICE so it
    /// keeps working after --user); without it, one log line and the
    /// workers run at their own priority. Linux (elsewhere the process's).
    #[arg(long, default_value_t = 0, value_name = "NICE", allow_negative_numbers = true,
          value_parser = clap::value_parser!(i32).range(-20..=0))]
    wake_nice: i32,

    /// Packets a worker moves after a wakeup before dropping back from
    /// --wake-nice, 1-65536.
    #[arg(long, default_value_t = config::DEFAULT_WAKE_BUDGET, value_name = "PACKETS",
          value_parser = clap::value_parser!(u64).range(1..=65536))]
    wake_budget: u64,

    /// Microseconds a worker keeps looking for packets after it last moved
    /// some, 0-10000, before it sleeps (0: off). Between looks it yields
    /// the CPU (sched_yield), so applications woken meanwhile still run at
    /// once; under a stream the worker rarely sleeps, so a packet that
    /// arrives is taken without a wakeup. Costs forwarder CPU while packets
    /// come (about a fifth more under one TCP stream at 100); none when
    /// idle. Needs no privilege [default: 100 with io_uring, 0 with poll].
    #[arg(long, value_name = "USEC",
          value_parser = clap::value_parser!(u64).range(0..=10_000))]
    spin: Option<u64>,

    /// Print a stats line every SECS seconds (0: only the final summary).
    #[arg(long, default_value_t = 0, value_name = "SECS")]
    stats_interval: u64,

    /// How stats lines and the summary are printed on stdout: text
    /// (`tunfwd: stats ... key=value`) or json (one object per line, with
    /// an "event" of "stats" or "summary" and the same fields).
    #[arg(long, value_enum, default_value = "text", value_name = "text|json")]
    stats_format: StatsFormatArg,

    /// Serve every counter in the Prometheus text format at
    /// http://ADDR:PORT/metrics. A bare PORT listens on 127.0.0.1 only; any
    /// other address must be given explicitly (e.g. 0.0.0.0:9500 or
    /// [::]:9500). At most 64 connections; a request must arrive within 5 s.
    /// With --netns, inside that namespace [default: off].
    #[arg(long, value_name = "[ADDR:]PORT", value_parser = crate::metrics::parse_listen)]
    metrics: Option<SocketAddr>,

    /// Enter the network namespace at PATH (e.g. /run/netns/NAME or
    /// /proc/PID/ns/net) before creating the device and sockets.
    #[arg(long, value_name = "PATH")]
    netns: Option<std::path::PathBuf>,

    /// Switch to this user (and group; default: the user's primary group),
    /// names or numeric ids, once the device, sockets and rings are set up.
    /// Forwarding needs no privilege after that; the process keeps no
    /// capabilities. Linux only.
    #[arg(long, value_name = "USER[:GROUP]")]
    user: Option<crate::types::UserSpec>,

    /// Stop cleanly when the parent process exits (used by `tunfwd bench`).
    #[arg(long, hide = true)]
    exit_with_parent: bool,
}

impl EngineArg {
    fn kind(self) -> EngineKind {
        match self {
            EngineArg::Auto => EngineKind::Auto,
            EngineArg::Uring => EngineKind::Uring,
            EngineArg::Poll => EngineKind::Poll,
        }
    }
}

/// A configuration from the shared options; tunnel-only settings at their
/// defaults (no offload, no TAP, no socket or io_uring tuning).
fn base_config(
    device: DeviceArgs,
    run: RunArgs,
    listen: SocketAddr,
    peers: Vec<crate::peers::PeerSpec>,
) -> TunnelConfig {
    TunnelConfig {
        mode: config::Mode::Tun {
            allowed_src: Vec::new(),
        },
        device: config::DeviceConfig {
            dev: device.dev,
            attach: device.attach,
            addresses: device.addresses,
            mtu: device.mtu.unwrap_or(config::DEFAULT_MTU),
            txqueuelen: device.txqueuelen,
        },
        peers: config::PeersConfig {
            listen,
            list: peers,
            file: None,
        },
        engine: config::EngineConfig {
            kind: run.engine.kind(),
            // `auto` once the mode is known: TunnelArgs::into_config.
            queues: run.queues.resolve(false, 0),
            queues_share_port: false,
            queues_auto: false,
            cpus: run.cpus,
            batch: run.batch,
            visit_bytes: run.visit_bytes,
            busy_poll: run.busy_poll,
            wake_nice: run.wake_nice,
            wake_budget: run.wake_budget,
            spin_us: run.spin,
            offload: config::Toggle::Off,
            sndbuf: None,
            rcvbuf: None,
            uring: config::UringFlags::default(),
        },
        queueing: config::QueueingConfig {
            aqm: None,
            flow_queues: false,
            inflight_bytes: config::DEFAULT_AQM_INFLIGHT_BYTES,
        },
        service: config::ServiceConfig {
            stats_peers: config::DEFAULT_STATS_PEERS,
            stats_format: run.stats_format.into(),
            metrics: run.metrics,
            stats_interval_secs: run.stats_interval,
            netns: run.netns,
            exit_with_parent: run.exit_with_parent,
            user: run.user,
        },
    }
}

#[derive(clap::Args, Debug)]
struct ReflectArgs {
    #[command(flatten)]
    device: DeviceArgs,

    #[command(flatten)]
    run: RunArgs,
}

impl ReflectArgs {
    fn into_config(self) -> TunnelConfig {
        // The workers' UDP sockets are bound to a kernel-chosen port and
        // never used: the reflector sends nothing to the network.
        let unused: SocketAddr = SocketAddr::from(([0, 0, 0, 0], 0));
        TunnelConfig {
            mode: config::Mode::Reflect,
            ..base_config(self.device, self.run, unused, Vec::new())
        }
    }
}

#[cfg(target_os = "linux")]
#[derive(clap::Args, Debug)]
struct BenchArgs {
    /// Targets to measure, in order: veth (bare underlay, no tunnel), vxlan
    /// (kernel VXLAN tunnel), wireguard-go (Debian's userspace WireGuard,
    /// configured with wg: needs wireguard-go and wireguard-tools), poll and
    /// uring (tunfwd's engines). A tunfwd target takes its own `tunnel`
    /// flags as +NAME or +NAME=VALUE, e.g. uring+multishot=off or
    /// uring+queues=2+batch=16 (values cannot contain commas, which separate
    /// targets). +wg runs both forwarders in WireGuard mode (fresh keys,
    /// --wg-config). +hub=N (2-30000) gives each forwarder N peers from a
    /// peers file instead of one --peer: the other side and N-1 synthetic
    /// peers with ten prefixes each, so every packet is routed and filtered
    /// through a large table.
    #[arg(long, value_delimiter = ',', default_value = "veth,vxlan,poll,uring", value_parser = crate::bench::Target::parse)]
    compare: Vec<crate::bench::Target>,

    /// Target the ratio column compares against (default: the first of --compare).
    #[arg(long, value_name = "TARGET")]
    baseline: Option<String>,

    /// Workloads: udp (flood at each --sizes), tcp (1 and --streams streams),
    /// latency (UDP ping-pong, idle and under a TCP load).
    #[arg(long, value_delimiter = ',', default_value = "udp,tcp,latency", value_parser = crate::bench::WorkloadKind::parse)]
    workloads: Vec<crate::bench::WorkloadKind>,

    /// UDP flood IP packet sizes in bytes (29-1450). Default 64,512,1400;
    /// --quick: 64,1400.
    #[arg(long, value_delimiter = ',', value_name = "BYTES")]
    sizes: Option<Vec<usize>>,

    /// Parallel streams of the multi-stream TCP workload. Default 4; --quick: 2.
    #[arg(long, value_name = "N")]
    streams: Option<usize>,

    /// Seconds per workload and target. Default 5; --quick: 1.
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,

    /// Cap on the offered UDP load in packets per second (0: as fast as the
    /// generator can send).
    #[arg(long, default_value_t = 0, value_name = "PPS")]
    rate_pps: u64,

    /// Milliseconds from one latency probe to the next (0-1000), as ping's
    /// -i: 5 probes a second... 1000 a second. The default, 5, leaves the
    /// forwarders idle between probes as a ping does, so an idle row pays
    /// their wakeups; 0 sends each probe as soon as the last is answered
    /// (the forwarders never sleep: the bench's figure before 2026-12).
    #[arg(long, default_value_t = 5.0, value_name = "MS")]
    probe_interval: f64,

    /// TCP with ECN at both ends (net.ipv4.tcp_ecn=1 in both namespaces):
    /// congestion signals from queue management become CE marks.
    #[arg(long)]
    ecn: bool,

    /// A short run: 1 s per workload, sizes 64,1400, 2 streams.
    #[arg(long)]
    quick: bool,

    /// Also write every figure, with kernel, CPU and flags, to this JSON file.
    #[arg(long, value_name = "FILE")]
    json: Option<std::path::PathBuf>,

    /// Flags passed unchanged to every `tunfwd tunnel` under test, after `--`,
    /// e.g. `tunfwd bench -- --batch 16`.
    #[arg(last = true, value_name = "TUNNEL FLAGS")]
    forwarder_args: Vec<String>,
}

#[cfg(target_os = "linux")]
impl BenchArgs {
    fn into_config(self) -> crate::bench::BenchConfig {
        let q = self.quick;
        crate::bench::BenchConfig {
            baseline: self
                .baseline
                .unwrap_or_else(|| self.compare.first().map(|t| t.name()).unwrap_or_default()),
            targets: self.compare,
            workloads: self.workloads,
            sizes: self.sizes.unwrap_or_else(|| {
                if q {
                    vec![64, 1400]
                } else {
                    vec![64, 512, 1400]
                }
            }),
            streams: self.streams.unwrap_or(if q { 2 } else { 4 }),
            duration: std::time::Duration::from_secs_f64(
                self.duration
                    .unwrap_or(if q { 1.0 } else { 5.0 })
                    .clamp(0.0, 3600.0),
            ),
            rate_pps: self.rate_pps,
            probe_interval: std::time::Duration::from_secs_f64(
                (self.probe_interval / 1e3).clamp(0.0, 3600.0),
            ),
            probe_interval_ms: self.probe_interval,
            ecn: self.ecn,
            json: self.json,
            forwarder_args: self.forwarder_args,
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum EngineArg {
    /// io_uring where the kernel allows it and (with offload) has multishot
    /// reads (Linux 6.7+), else poll (said in one log line).
    Auto,
    /// io_uring (Linux 6.0+): batched, one kernel entry per loop iteration.
    Uring,
    /// poll(2) over nonblocking descriptors; portable.
    Poll,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum ModeArg {
    /// IP packets (a TUN device).
    Tun,
    /// Ethernet frames (a TAP device), carried in VXLAN.
    Tap,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum EncapArg {
    /// One IP packet per datagram (TUN mode).
    None,
    /// An 8-byte VXLAN header and an Ethernet frame per datagram (TAP mode;
    /// the kernel's vxlan device is a peer).
    Vxlan,
}

/// How many CPUs the workers may use: the distinct ones of a `--cpus`
/// list, else those of the process's affinity (0 where unknown).
fn usable_cpus(plan: &config::CpuPlan) -> usize {
    match plan {
        config::CpuPlan::List(list) => list.iter().collect::<std::collections::BTreeSet<_>>().len(),
        _ => crate::platform::allowed_cpus().map_or(0, |c| c.len()),
    }
}

/// `ADDR:PORT`, where an IPv6 address may carry its scope as a number or an
/// interface name: `[fe80::2%eth0]:5000` (the name is looked up here, in the
/// namespace tunfwd starts in; with --netns give the number).
use crate::platform::parse_endpoint;

/// `--peer ADDR:PORT[=CIDR,...]`.
fn parse_peer(s: &str) -> Result<crate::peers::PeerSpec, String> {
    crate::peers::PeerSpec::parse_with(s, parse_endpoint)
}

/// Parses `aa:bb:cc:dd:ee:ff`.
fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let bad = || format!("{s:?} is not a MAC address like 02:00:00:00:00:01");
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!(
            "{s}: a multicast address cannot be an interface address"
        ));
    }
    Ok(mac)
}

/// `--stats-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum StatsFormatArg {
    Text,
    Json,
}

impl From<StatsFormatArg> for config::StatsFormat {
    fn from(f: StatsFormatArg) -> Self {
        match f {
            StatsFormatArg::Text => config::StatsFormat::Text,
            StatsFormatArg::Json => config::StatsFormat::Json,
        }
    }
}

/// `--aqm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum AqmArg {
    FqCodel,
    Codel,
    Off,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum ToggleArg {
    On,
    Off,
    Auto,
}

impl From<ToggleArg> for config::Toggle {
    fn from(t: ToggleArg) -> Self {
        match t {
            ToggleArg::On => config::Toggle::On,
            ToggleArg::Off => config::Toggle::Off,
            ToggleArg::Auto => config::Toggle::Auto,
        }
    }
}

#[derive(clap::Args, Debug)]
struct TunnelArgs {
    /// Read settings from this TOML file: keys are the long flag names
    /// (listen = "198.18.0.1:5000", mtu = 1400, peer = ["ADDR:PORT=CIDR"],
    /// busy-poll = true). A flag on the command line wins over the file (a
    /// repeatable flag's list replaces the file's). Unknown keys and bad
    /// values are errors naming the file, line and key.
    #[arg(long, value_name = "FILE")]
    config: Option<std::path::PathBuf>,

    #[command(flatten)]
    device: DeviceArgs,

    /// Accept from the peer only inner packets whose source address is in
    /// this prefix, e.g. 198.19.0.0/24 (repeatable, like WireGuard's
    /// AllowedIPs; host bits are ignored). Others are dropped and counted as
    /// source_not_allowed. Default: any source. TUN mode only.
    #[arg(long = "allow-src", value_name = "CIDR")]
    allow_src: Vec<crate::types::Prefix>,

    /// tun: IP packets; tap: Ethernet frames in VXLAN (needs --vni; for a
    /// kernel vxlan peer use --mtu 1450 and port 4789).
    #[arg(long, value_enum, default_value = "tun")]
    mode: ModeArg,

    /// Encapsulation [default: none with --mode tun, vxlan with --mode tap].
    #[arg(long, value_enum)]
    encap: Option<EncapArg>,

    /// VXLAN network identifier, 0-16777215 (--mode tap).
    #[arg(long, value_name = "VNI")]
    vni: Option<u32>,

    /// Ethernet address of the TAP device [default: chosen by the kernel].
    #[arg(long, value_name = "MAC", value_parser = parse_mac)]
    mac: Option<[u8; 6]>,

    /// Local UDP address to bind, e.g. 198.18.0.1:5000, [::]:5000, or a
    /// link-local one with its interface, [fe80::1%eth0]:5000. With
    /// --queues N (without --share-port), queue i binds PORT+i. Required,
    /// except with --wg-config,
    /// whose ListenPort is bound on the wildcard address of both families
    /// ([::]:PORT) unless --listen is given.
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_endpoint)]
    listen: Option<SocketAddr>,

    /// Plaintext TUN tunnels with several queues: every queue binds the one
    /// --listen port (SO_REUSEPORT) and the kernel hands each datagram to
    /// the worker of its inner flow (classic BPF on the socket group; where
    /// that is refused, one line says so and one worker receives), so a
    /// flow keeps one worker on both ends and the ends need not run as many
    /// queues: this end pairs with another such end or with any end of one
    /// queue (socat, --queues 1). On by default with --queues auto (the
    /// default); needed only with a number: without it, --queues N binds
    /// PORT+i for queue i and both ends need the same N. (WireGuard's
    /// queues always share their port.)
    #[arg(long)]
    share_port: bool,

    /// WireGuard: seal packets for the peers of this file, in the format
    /// `wg setconf` reads ([Interface] PrivateKey, ListenPort, FwMark;
    /// [Peer] PublicKey, PresharedKey, Endpoint, AllowedIPs,
    /// PersistentKeepalive), interoperating with wireguard-go and the
    /// kernel's WireGuard. The file must not be readable by group or others
    /// (it holds the private key). Replaces --peer, --peers-file and
    /// --allow-src; TUN mode. With --queues N every worker binds the one
    /// port (SO_REUSEPORT).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["peer", "peers_file", "allow_src", "encap", "vni", "mac"])]
    wg_config: Option<std::path::PathBuf>,

    /// WireGuard mode without a file: the interface starts with no private
    /// key, no peers and a UDP port the kernel picks, and `wg` (or
    /// wg-quick, through `tunfwd-wg`) configures it through WireGuard's
    /// userspace API at /var/run/wireguard/DEV.sock, as with
    /// wireguard-go. With --wg-config, the file's settings come first (and
    /// `wg` may change them too).
    #[arg(long, conflicts_with_all = ["peer", "peers_file", "allow_src", "encap", "vni", "mac"])]
    wireguard: bool,

    /// A peer's UDP address (a link-local one with its interface,
    /// [fe80::2%eth0]:5000), optionally with the inner prefixes it owns:
    /// ADDR:PORT=CIDR,CIDR... (IPv4 and IPv6). Repeatable. A single peer
    /// without prefixes is a point-to-point tunnel: every packet goes to it
    /// and anything from it is accepted (subject to --allow-src). With
    /// prefixes (WireGuard's AllowedIPs): a packet goes to the peer whose
    /// prefix is the longest match for its destination (none: dropped as
    /// no_route), and a datagram from a peer is accepted only if its inner
    /// source matches that same peer (else source_not_allowed). Only
    /// datagrams from a peer's address and port reach the device. With
    /// --queues N (without --share-port), queue i talks to each peer's
    /// PORT+i.
    #[arg(long, value_name = "ADDR:PORT[=CIDR,...]", value_parser = parse_peer)]
    peer: Vec<crate::peers::PeerSpec>,

    /// More peers, one per line: ADDR:PORT CIDR,CIDR... ('#' starts a
    /// comment; blank lines are skipped). Read at start; SIGHUP reads it
    /// again and swaps the whole table (peers added start, peers removed
    /// stop, the rest carry on); a file with an error is refused whole and
    /// the old table stays. Prefixes must have no host bits set. Limits:
    /// 1,048,576 peers, and peers x --queues at most 1,048,576 (each worker
    /// keeps 256 bytes of counters per peer: 256 MiB; a reload briefly
    /// holds the old table too).
    #[arg(long, value_name = "FILE")]
    peers_file: Option<std::path::PathBuf>,

    /// Peers listed in each stats line and in the summary, most traffic
    /// first (with prefixes only; 0: none) [default: 10].
    #[arg(long, value_name = "N")]
    stats_peers: Option<usize>,

    #[command(flatten)]
    run: RunArgs,

    /// Offloads: the TUN device hands over TCP/UDP super-packets (TSO, USO)
    /// that tunfwd cuts into MTU-sized packets and sends with UDP GSO; UDP
    /// GRO on receive, and TCP segments coalesced before the TUN write.
    /// Datagrams on the wire stay one IP packet each. auto: on where
    /// available (the uring engine needs multishot receives for it).
    #[arg(long, value_enum, default_value = "auto", value_name = "on|off|auto")]
    offload: ToggleArg,

    /// Queue management (TUN mode). fq-codel: tunfwd reads the TUN device
    /// promptly into per-flow queues (a keyed hash of the inner 5-tuple),
    /// served by deficit round robin in bytes with priority for sparse
    /// flows (pings, DNS, ACKs leave ahead of a bulk backlog), CoDel per
    /// flow on the time spent queued (RFC 8290), and in overload (the
    /// device's ring overflowing) reads that find no free buffer drop the
    /// heads of the fattest flows, until half the buffers are free, before
    /// any work is spent on them; packets from the peer get CoDel on the time they waited
    /// in the UDP receive buffer (kernel arrival timestamps). A CoDel
    /// signal is a CE mark on an ECN-capable packet, else a drop. codel:
    /// only the receive side's CoDel. off: FIFO, whatever queue builds.
    #[arg(
        long,
        value_enum,
        default_value = "fq-codel",
        value_name = "fq-codel|codel|off"
    )]
    aqm: AqmArg,

    /// CoDel target: the standing queue delay it tolerates, in microseconds
    /// [default: 500].
    #[arg(long, value_name = "US")]
    aqm_target_us: Option<u64>,

    /// CoDel interval: how long the delay must stay above target before it
    /// acts, about the longest round trip of the tunnel's flows, in
    /// microseconds [default: 10000].
    #[arg(long, value_name = "US")]
    aqm_interval_us: Option<u64>,

    /// With --aqm fq-codel: bytes handed out by each side's flow queues
    /// and not yet sent (or written to the TUN device), 1500-67108864: a
    /// fixed byte queue limit (BQL) that keeps the destination busy while
    /// the rest waits where a sparse flow can pass it [default: 65536: one super-packet].
    #[arg(long, value_name = "BYTES")]
    aqm_inflight_bytes: Option<usize>,

    /// UDP socket send buffer in bytes, 1024-1073741824; beyond
    /// net.core.wmem_max only with CAP_NET_ADMIN (else clamped, said in one
    /// line) [default: 4194304].
    #[arg(long, value_name = "BYTES")]
    sndbuf: Option<usize>,

    /// UDP socket receive buffer in bytes, 1024-1073741824: room for bursts
    /// while a worker is not running; beyond net.core.rmem_max only with
    /// CAP_NET_ADMIN (else clamped, said in one line) [default: 4194304].
    #[arg(long, value_name = "BYTES")]
    rcvbuf: Option<usize>,

    /// io_uring: submission queue entries per worker, 8-32768 (completion
    /// queue: 4x) [default: 256].
    #[arg(long, value_name = "N", help_heading = "io_uring engine")]
    ring_entries: Option<u32>,

    /// io_uring: packet buffers per worker, half per direction; a power of
    /// two, 2-32768 [default: 512, or 64 when offload is on: each buffer
    /// then holds a 64 KiB super-packet].
    #[arg(long, value_name = "N", help_heading = "io_uring engine")]
    buffers: Option<u32>,

    /// io_uring: single-shot reads kept outstanding per descriptor when
    /// multishot is off or unavailable [default: 2].
    #[arg(long, value_name = "N", help_heading = "io_uring engine")]
    inflight: Option<u32>,

    /// io_uring: multishot receives from provided buffer rings (TUN needs
    /// Linux 6.7+) [default: auto].
    #[arg(
        long,
        value_enum,
        value_name = "on|off|auto",
        help_heading = "io_uring engine"
    )]
    multishot: Option<ToggleArg>,

    /// io_uring: registered (fixed) buffers for TUN reads and writes; they
    /// count against RLIMIT_MEMLOCK [default: auto].
    #[arg(
        long,
        value_enum,
        value_name = "on|off|auto",
        help_heading = "io_uring engine"
    )]
    fixed_buffers: Option<ToggleArg>,

    /// io_uring: a kernel thread polls the submission queue, sleeping after
    /// IDLE_MS milliseconds without work [default when given: 1000]. Burns
    /// CPU; off by default.
    #[arg(long, value_name = "IDLE_MS", num_args = 0..=1, default_missing_value = "1000", require_equals = true, help_heading = "io_uring engine")]
    sqpoll: Option<u32>,

    /// io_uring: pin the SQPOLL thread to this CPU.
    #[arg(long, value_name = "CPU", help_heading = "io_uring engine")]
    sqpoll_cpu: Option<u32>,
}

impl TunnelArgs {
    fn into_config(self) -> crate::error::Result<TunnelConfig> {
        use crate::error::Error;
        let wg = self.wg_config.clone();
        let wireguard = wg.is_some() || self.wireguard;
        let mode = match (self.mode, self.encap) {
            (ModeArg::Tap, _) if wireguard => {
                return Err(Error::config(
                    "WireGuard (--wg-config, --wireguard) carries IP packets: use it with --mode tun",
                ));
            }
            (_, _) if wireguard => config::Mode::WireGuard {
                config: wg.clone(),
                listen_from_file: self.listen.is_none(),
            },
            (ModeArg::Tun, None | Some(EncapArg::None)) => {
                if self.vni.is_some() {
                    return Err(Error::config("--vni applies to --mode tap only"));
                }
                if self.mac.is_some() {
                    return Err(Error::config("--mac applies to --mode tap only"));
                }
                config::Mode::Tun {
                    allowed_src: self.allow_src,
                }
            }
            (ModeArg::Tun, Some(EncapArg::Vxlan)) => {
                return Err(Error::config(
                    "--encap vxlan carries Ethernet frames: use it with --mode tap",
                ));
            }
            (ModeArg::Tap, None | Some(EncapArg::Vxlan)) => {
                if !self.allow_src.is_empty() {
                    return Err(Error::config(
                        "--allow-src checks inner IP sources: not available in TAP mode",
                    ));
                }
                config::Mode::Tap {
                    vni: self.vni.ok_or_else(|| {
                        Error::config("--mode tap needs --vni N (the VXLAN network identifier)")
                    })?,
                    mac: self.mac,
                }
            }
            (ModeArg::Tap, Some(EncapArg::None)) => {
                return Err(Error::config(
                    "--mode tap needs --encap vxlan (plain Ethernet over UDP is not supported)",
                ));
            }
        };
        let aqm = match self.aqm {
            AqmArg::Off => {
                if self.aqm_target_us.is_some() || self.aqm_interval_us.is_some() {
                    return Err(Error::config(
                        "--aqm-target-us and --aqm-interval-us apply to --aqm fq-codel or codel only",
                    ));
                }
                None
            }
            AqmArg::FqCodel | AqmArg::Codel => {
                let d = crate::aqm::CodelParams::default();
                Some(crate::aqm::CodelParams {
                    target: self
                        .aqm_target_us
                        .map(std::time::Duration::from_micros)
                        .unwrap_or(d.target),
                    interval: self
                        .aqm_interval_us
                        .map(std::time::Duration::from_micros)
                        .unwrap_or(d.interval),
                })
            }
        };
        let inflight_bytes = match (self.aqm, self.aqm_inflight_bytes) {
            (AqmArg::FqCodel, n) => n.unwrap_or(config::DEFAULT_AQM_INFLIGHT_BYTES),
            (_, None) => config::DEFAULT_AQM_INFLIGHT_BYTES,
            (_, Some(_)) => {
                return Err(Error::config(
                    "--aqm-inflight-bytes applies to --aqm fq-codel only",
                ));
            }
        };
        let listen = match (self.listen, &mode) {
            (Some(l), _) => l,
            // The file's ListenPort, set by the runtime once it is read.
            (None, config::Mode::WireGuard { .. }) => {
                SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
            }
            (None, _) => {
                return Err(Error::config(
                    "--listen ADDR:PORT is required (the local UDP address), except with \
                     --wg-config",
                ));
            }
        };
        let wg_mtu = mode.is_wireguard() && self.device.mtu.is_none();
        let auto = self.run.queues == config::QueueCount::Auto;
        let plain_tun = matches!(mode, config::Mode::Tun { .. });
        if self.share_port && !plain_tun {
            return Err(Error::config(
                "--share-port applies to plaintext TUN tunnels (WireGuard's queues share their \
                 port already)",
            ));
        }
        // Where the queues share the port (WireGuard; plaintext TUN with
        // --share-port, or by default) the ends need not agree on the
        // count, and auto counts CPUs.
        let share_port = self.share_port || (auto && plain_tun);
        let queues = self.run.queues.resolve(
            mode.is_wireguard() || share_port,
            usable_cpus(&self.run.cpus),
        );
        let mut cfg = base_config(self.device, self.run, listen, self.peer);
        cfg.engine.queues = queues;
        cfg.engine.queues_share_port = share_port;
        cfg.engine.queues_auto = auto;
        if wg_mtu {
            cfg.device.mtu = config::DEFAULT_MTU_WIREGUARD;
        }
        cfg.mode = mode;
        cfg.engine.offload = self.offload.into();
        cfg.engine.sndbuf = self.sndbuf;
        cfg.engine.rcvbuf = self.rcvbuf;
        cfg.engine.uring = config::UringFlags {
            ring_entries: self.ring_entries,
            buffers: self.buffers,
            inflight: self.inflight,
            multishot: self.multishot.map(Into::into),
            fixed_buffers: self.fixed_buffers.map(Into::into),
            sqpoll_idle_ms: self.sqpoll,
            sqpoll_cpu: self.sqpoll_cpu,
        };
        cfg.queueing = config::QueueingConfig {
            aqm,
            flow_queues: self.aqm == AqmArg::FqCodel,
            inflight_bytes,
        };
        cfg.peers.file = self.peers_file;
        cfg.service.stats_peers = self.stats_peers.unwrap_or(config::DEFAULT_STATS_PEERS);
        Ok(cfg)
    }
}

/// The configuration `tunfwd tunnel ARGS...` (a whole command line, with
/// any --config file applied) would run with, validated: for tests of the
/// config file against the flags.
pub fn tunnel_config(argv: Vec<std::ffi::OsString>) -> crate::error::Result<TunnelConfig> {
    let (argv, origin) = crate::configfile::expand(argv, &Cli::command())?;
    let cli = Cli::try_parse_from(argv)
        .map_err(|e| crate::error::Error::config(e.to_string().trim().to_string()))?;
    let Command::Tunnel(args) = cli.command else {
        return Err(crate::error::Error::config("not a tunnel command line"));
    };
    let locate = |e| match &origin {
        Some(o) => o.locate(e),
        None => e,
    };
    let cfg = args.into_config().map_err(locate)?;
    cfg.validate().map_err(locate)?;
    Ok(cfg)
}

/// The unit template, as in the repository (`src/dist/tunfwd@.service`).
pub const SYSTEMD_UNIT: &str = include_str!("dist/tunfwd@.service");

/// `tunfwd systemd-unit`: the template with ExecStart's executable set.
/// `tunfwd genkey`: a private key on standard output; a warning (as `wg
/// genkey` gives) if that is a file others may read.
fn genkey() -> crate::error::Result<()> {
    use std::io::Write as _;
    let key = crate::wg::Secret::generate()
        .map_err(|e| crate::error::Error::io("read random bytes from /dev/urandom", e))?;
    let stdout = std::io::stdout();
    if let Ok(st) = nix::sys::stat::fstat(&stdout) {
        if st.st_mode & libc::S_IFMT == libc::S_IFREG && st.st_mode & 0o007 != 0 {
            crate::info!(
                "warning: writing a private key to a file others may read; set umask 077 first"
            );
        }
    }
    let mut out = stdout.lock();
    writeln!(out, "{}", key.to_base64())
        .and_then(|()| out.flush())
        .map_err(|e| crate::error::Error::io("write the key to standard output", e))
}

/// `tunfwd pubkey`: the public key of the private key on standard input.
fn pubkey() -> crate::error::Result<()> {
    use std::io::Read as _;
    let mut text = String::new();
    std::io::stdin()
        .take(1024)
        .read_to_string(&mut text)
        .map_err(|e| crate::error::Error::io("read a private key from standard input", e))?;
    let key =
        crate::wg::Secret::parse(&text, "standard input").map_err(crate::error::Error::config)?;
    zeroize::Zeroize::zeroize(&mut text);
    println!("{}", key.public_key());
    Ok(())
}

fn systemd_unit(exec: Option<std::path::PathBuf>) -> crate::error::Result<()> {
    let exe = match exec {
        Some(p) => p,
        None => std::env::current_exe()
            .map_err(|e| crate::error::Error::io("find this executable", e))?,
    };
    let exe = exe.display().to_string();
    if exe.contains(char::is_whitespace) {
        return Err(crate::error::Error::config(format!(
            "{exe:?}: a path with blanks cannot go into ExecStart unquoted; give --exec"
        )));
    }
    let unit = SYSTEMD_UNIT.replace("/usr/local/bin/tunfwd", &exe);
    use std::io::Write as _;
    let _ = std::io::stdout().lock().write_all(unit.as_bytes());
    Ok(())
}

/// `tunfwd man`: one page to stdout, or all into a directory.
fn man(sub: Option<&str>, out_dir: Option<&std::path::Path>) -> crate::error::Result<()> {
    use crate::error::Error;
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    if let Some(dir) = out_dir {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        return clap_mangen::generate_to(cmd, dir)
            .map_err(|e| Error::io(format!("write man pages to {}", dir.display()), e));
    }
    let page = match sub {
        None => cmd,
        Some(name) => cmd.find_subcommand(name).cloned().ok_or_else(|| {
            Error::config(format!(
                "no subcommand {name:?}: tunnel, reflect, bench, completions or man"
            ))
        })?,
    };
    // (Built: a subcommand's page is titled tunfwd-NAME.)
    let mut out = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut out)
        .map_err(|e| Error::io("render the man page", e))?;
    use std::io::Write as _;
    let _ = std::io::stdout().lock().write_all(&out);
    Ok(())
}

/// Parses the command line, runs it, and maps errors to one line on stderr
/// and a non-zero exit code.
pub fn main() -> ExitCode {
    if let Err(e) = crate::runtime::block_stop_signals() {
        crate::info!("error: {e}");
        return ExitCode::FAILURE;
    }
    let (argv, origin) =
        match crate::configfile::expand(std::env::args_os().collect(), &Cli::command()) {
            Ok(x) => x,
            Err(e) => {
                crate::info!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
    let cli = Cli::parse_from(argv);
    let locate = |e| match &origin {
        Some(o) => o.locate(e),
        None => e,
    };
    let result = match cli.command {
        Command::Tunnel(args) => args
            .into_config()
            .and_then(|c| c.validate().map(|()| c))
            .map_err(locate)
            .and_then(|c| crate::runtime::run_tunnel(&c))
            .map(|()| true),
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            let shell = match shell {
                ShellArg::Bash => clap_complete::Shell::Bash,
                ShellArg::Zsh => clap_complete::Shell::Zsh,
                ShellArg::Fish => clap_complete::Shell::Fish,
            };
            clap_complete::generate(shell, &mut cmd, "tunfwd", &mut std::io::stdout());
            Ok(true)
        }
        Command::Man {
            subcommand,
            out_dir,
        } => man(subcommand.as_deref(), out_dir.as_deref()).map(|()| true),
        Command::SystemdUnit { exec } => systemd_unit(exec).map(|()| true),
        #[cfg(target_os = "linux")]
        Command::Bench(args) => crate::bench::run(&args.into_config()),
        Command::Reflect(args) => crate::runtime::run_tunnel(&args.into_config()).map(|()| true),
        Command::Genkey => genkey().map(|()| true),
        Command::Pubkey => pubkey().map(|()| true),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        // Interrupted by a signal after cleaning up.
        Ok(false) => ExitCode::from(130),
        Err(e) => {
            crate::info!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
