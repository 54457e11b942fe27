//! `tunfwd bench`: builds its own two-namespace topology, measures each
//! target (bare veth, kernel VXLAN, tunfwd engines) under the same workloads
//! in one run, and reports absolute numbers next to ratios against a
//! baseline. Nothing it creates outlives it: the namespaces are anonymous and
//! the forwarders die with it.

pub mod forwarders;
pub mod report;
pub mod sched;
pub mod topology;
pub mod traffic;
pub mod wggo;

use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};
use serde_json::json;

use self::forwarders::{ForwarderPair, PairCounters, Reflector, system_cpu_seconds};

/// The tunfwd processes of one measurement.
enum Running {
    Pair(ForwarderPair),
    Reflector(Reflector),
    WireguardGo(wggo::WireguardGo),
}

impl Running {
    fn cpu_seconds(&self) -> f64 {
        match self {
            Running::Pair(p) => p.cpu_seconds(),
            Running::Reflector(r) => r.cpu_seconds(),
            Running::WireguardGo(w) => w.cpu_seconds(),
        }
    }

    /// The scheduler's figures for each forwarder process, by name.
    fn sched(&self) -> Vec<(String, sched::Sched)> {
        match self {
            Running::Pair(p) => p.sched(),
            Running::Reflector(r) => r.sched(),
            Running::WireguardGo(w) => w.sched(),
        }
    }

    /// Stops it; tunfwd's own counters (wireguard-go has none to give).
    fn stop(self) -> Result<Option<PairCounters>> {
        match self {
            Running::Pair(p) => p.stop().map(Some),
            Running::Reflector(r) => r.stop().map(Some),
            Running::WireguardGo(w) => {
                w.stop();
                Ok(None)
            }
        }
    }
}
use self::report::{Load, Percentiles, Row, Workload};
use self::topology::{TUN_B, Topology, UNDERLAY_B, VXLAN_B};
use crate::error::{Context, Error, Result};

/// Most peers `+hub=N` configures.
pub const MAX_HUB_PEERS: usize = 30_000;

/// Something to measure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// The bare underlay: no tunnel at all.
    Veth,
    /// The kernel's own UDP tunnel over the same underlay.
    Vxlan,
    /// tunfwd with this engine and extra `tunnel` flags, named as given
    /// (`uring+multishot=off+batch=8`).
    Tunfwd {
        spec: String,
        engine: String,
        args: Vec<String>,
        /// `+hub=N`: each forwarder has N peers configured (its real peer
        /// and N-1 synthetic ones with ten prefixes each), so every packet
        /// is routed and filtered through a large table.
        hub: Option<usize>,
        /// `+wg`: both forwarders in WireGuard mode (`--wg-config`, fresh
        /// keys), sealing every packet.
        wg: bool,
    },
    /// Debian's wireguard-go on both sides (configured with `wg`), the
    /// userspace WireGuard baseline.
    WireguardGo,
    /// `tunfwd reflect` in namespace a as the far end of the latency
    /// probes: the TUN path alone (latency workloads only).
    Reflect { spec: String, args: Vec<String> },
}

impl Target {
    /// `veth`, `vxlan`, or an engine (`poll`, `uring`) optionally followed
    /// by `+FLAG` or `+FLAG=VALUE` items, each becoming `--FLAG [VALUE]` for
    /// that target's forwarders only.
    pub fn parse(s: &str) -> std::result::Result<Target, String> {
        let mut parts = s.split('+');
        let head = parts.next().unwrap_or_default();
        match head {
            "veth" | "vxlan" | "wireguard-go" if s.contains('+') => {
                Err(format!("{s:?}: flags (+...) apply to tunfwd targets only"))
            }
            "veth" => Ok(Target::Veth),
            "vxlan" => Ok(Target::Vxlan),
            "wireguard-go" => Ok(Target::WireguardGo),
            "poll" | "uring" | "reflect" => {
                let mut args = Vec::new();
                let mut hub = None;
                let mut wg = false;
                for item in parts {
                    let (flag, value) = match item.split_once('=') {
                        Some((f, v)) => (f, Some(v)),
                        None => (item, None),
                    };
                    if flag == "hub" && head != "reflect" {
                        hub = Some(
                            value
                                .and_then(|v| v.parse::<usize>().ok())
                                .filter(|n| (2..=MAX_HUB_PEERS).contains(n))
                                .ok_or_else(|| {
                                    format!("{s:?}: +hub=N needs N peers from 2 to {MAX_HUB_PEERS}")
                                })?,
                        );
                        continue;
                    }
                    if flag == "wg" && value.is_none() && head != "reflect" {
                        wg = true;
                        continue;
                    }
                    if flag.is_empty() || flag.starts_with('-') {
                        return Err(format!(
                            "{s:?}: write flags as +NAME or +NAME=VALUE (e.g. uring+batch=8)"
                        ));
                    }
                    args.push(format!("--{flag}"));
                    args.extend(value.map(str::to_string));
                }
                if head == "reflect" {
                    return Ok(Target::Reflect {
                        spec: s.to_string(),
                        args,
                    });
                }
                if wg && hub.is_some() {
                    return Err(format!("{s:?}: +wg and +hub=N do not go together (yet)"));
                }
                Ok(Target::Tunfwd {
                    spec: s.to_string(),
                    engine: head.to_string(),
                    args,
                    hub,
                    wg,
                })
            }
            other => Err(format!(
                "unknown bench target {other:?}: use veth, vxlan, wireguard-go, poll, uring or \
                 reflect (poll and uring optionally +wg, +hub=N, +FLAG=VALUE...)"
            )),
        }
    }

    pub fn name(&self) -> String {
        match self {
            Target::Veth => "veth".into(),
            Target::Vxlan => "vxlan".into(),
            Target::WireguardGo => "wireguard-go".into(),
            Target::Tunfwd { spec, .. } | Target::Reflect { spec, .. } => spec.clone(),
        }
    }

    /// The reflector only serves as a latency far end, idle.
    fn runs(&self, w: &Workload) -> bool {
        !matches!(self, Target::Reflect { .. }) || *w == Workload::Latency { load: Load::Idle }
    }

    fn dst(&self) -> Ipv4Addr {
        match self {
            Target::Veth => UNDERLAY_B,
            Target::Vxlan => VXLAN_B,
            Target::WireguardGo => wggo::OVERLAY_B,
            Target::Tunfwd { .. } => TUN_B,
            Target::Reflect { .. } => std::net::Ipv4Addr::new(198, 19, 3, 2),
        }
    }
}

/// Which workloads to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkloadKind {
    Udp,
    Tcp,
    Latency,
}

impl WorkloadKind {
    pub fn parse(s: &str) -> std::result::Result<WorkloadKind, String> {
        match s {
            "udp" => Ok(WorkloadKind::Udp),
            "tcp" => Ok(WorkloadKind::Tcp),
            "latency" => Ok(WorkloadKind::Latency),
            other => Err(format!(
                "unknown workload {other:?}: use udp, tcp or latency"
            )),
        }
    }
}

/// Everything `tunfwd bench` was asked for.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub targets: Vec<Target>,
    /// Name of the target ratios are computed against.
    pub baseline: String,
    pub workloads: Vec<WorkloadKind>,
    /// UDP flood IP packet sizes in bytes.
    pub sizes: Vec<usize>,
    /// Parallel streams of the multi-stream TCP workload.
    pub streams: usize,
    pub duration: Duration,
    /// Offered UDP load cap (0: as fast as the generator can).
    pub rate_pps: u64,
    /// From one latency probe to the next (zero: back to back).
    pub probe_interval: Duration,
    /// As given, for validation (milliseconds).
    pub probe_interval_ms: f64,
    /// TCP with ECN in both namespaces (`net.ipv4.tcp_ecn=1`).
    pub ecn: bool,
    pub json: Option<PathBuf>,
    /// Passed unchanged to every `tunfwd tunnel` under test.
    pub forwarder_args: Vec<String>,
}

/// Largest UDP flood packet: the forwarders' default MTU and below VXLAN's.
const MAX_PACKET_LEN: usize = topology::VXLAN_MTU as usize;
/// Smallest: IPv4 + UDP headers and one payload byte.
const MIN_PACKET_LEN: usize = traffic::UDP_OVERHEAD + 1;

impl BenchConfig {
    pub fn validate(&self) -> Result<()> {
        if self.targets.is_empty() {
            return Err(Error::config("--compare needs at least one target"));
        }
        if !self.targets.iter().any(|t| t.name() == self.baseline) {
            return Err(Error::config(format!(
                "--baseline {} is not one of --compare",
                self.baseline
            )));
        }
        if let Some(bad) = self
            .sizes
            .iter()
            .find(|&&s| !(MIN_PACKET_LEN..=MAX_PACKET_LEN).contains(&s))
        {
            return Err(Error::config(format!(
                "--sizes {bad} is out of range {MIN_PACKET_LEN}..={MAX_PACKET_LEN} bytes"
            )));
        }
        if self.streams == 0 || self.streams > 64 {
            return Err(Error::config("--streams must be 1..=64"));
        }
        if self.duration.is_zero() {
            return Err(Error::config("--duration must be above 0"));
        }
        if !(0.0..=1000.0).contains(&self.probe_interval_ms) {
            return Err(Error::config(format!(
                "--probe-interval {} is out of range 0..=1000 ms",
                self.probe_interval_ms
            )));
        }
        Ok(())
    }

    /// The workloads in run order.
    fn plan(&self) -> Vec<Workload> {
        let mut plan = Vec::new();
        for kind in &self.workloads {
            match kind {
                WorkloadKind::Udp => plan.extend(
                    self.sizes
                        .iter()
                        .map(|&packet_len| Workload::Udp { packet_len }),
                ),
                WorkloadKind::Tcp => {
                    plan.push(Workload::Tcp { streams: 1 });
                    if self.streams > 1 {
                        plan.push(Workload::Tcp {
                            streams: self.streams,
                        });
                    }
                }
                WorkloadKind::Latency => {
                    plan.push(Workload::Latency { load: Load::Idle });
                    plan.push(Workload::Latency { load: Load::Tcp(1) });
                    if self.streams > 1 {
                        plan.push(Workload::Latency {
                            load: Load::Tcp(self.streams),
                        });
                    }
                    plan.push(Workload::Latency { load: Load::Flood });
                }
            }
        }
        plan
    }
}

fn progress(msg: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr().lock(), "bench: {msg}");
}

/// Runs the bench; Ok(false) if interrupted (everything is cleaned up).
pub fn run(cfg: &BenchConfig) -> Result<bool> {
    cfg.validate()?;
    if !nix::unistd::geteuid().is_root() {
        return Err(Error::config(
            "tunfwd bench creates network namespaces and devices: run it as root",
        ));
    }
    let stop = Arc::new(AtomicBool::new(false));
    {
        // SIGINT/SIGTERM are blocked (cli::main); take them here.
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("bench-signals".into())
            .spawn(move || {
                let mut set = SigSet::empty();
                set.add(Signal::SIGINT);
                set.add(Signal::SIGTERM);
                if let Ok(sig) = set.wait() {
                    progress(format_args!(
                        "{} received: stopping and cleaning up",
                        sig.as_str()
                    ));
                    stop.store(true, Ordering::SeqCst);
                }
            })
            .map_err(|e| Error::io("spawn signal thread", e))?;
    }

    progress(format_args!("building topology (2 namespaces, veth)"));
    let topo = Topology::new()?;
    if cfg.ecn {
        topo.enable_tcp_ecn()?;
    }
    if cfg.targets.contains(&Target::Vxlan) {
        topo.add_vxlan()?;
    }
    let plan = cfg.plan();
    let total: usize = cfg
        .targets
        .iter()
        .map(|t| plan.iter().filter(|w| t.runs(w)).count())
        .sum();
    let started = Instant::now();
    let mut rows = Vec::with_capacity(total);
    let mut step = 0;
    'outer: for target in &cfg.targets {
        for workload in plan.iter().filter(|w| target.runs(w)) {
            if stop.load(Ordering::SeqCst) {
                break 'outer;
            }
            step += 1;
            progress(format_args!(
                "[{step}/{total}] {} {} ({:.0} s elapsed)",
                target.name(),
                workload.label(),
                started.elapsed().as_secs_f64()
            ));
            let row = measure(&topo, cfg, target, workload, &stop)?;
            rows.push(row);
        }
    }
    let interrupted = stop.load(Ordering::SeqCst);
    report::set_ratios(&mut rows, &cfg.baseline);
    let _ = write!(
        std::io::stdout().lock(),
        "{}",
        report::table(&rows, &cfg.baseline)
    );
    let meta = json!({
        "tunfwd_version": env!("CARGO_PKG_VERSION"),
        "kernel": kernel_release(),
        "cpu_model": cpu_model(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "baseline": cfg.baseline,
        "targets": cfg.targets.iter().map(Target::name).collect::<Vec<_>>(),
        "duration_s": cfg.duration.as_secs_f64(),
        "sizes": cfg.sizes,
        "streams": cfg.streams,
        "rate_pps": cfg.rate_pps,
        "probe_interval_ms": cfg.probe_interval.as_secs_f64() * 1e3,
        "tcp_ecn": cfg.ecn,
        "forwarder_args": cfg.forwarder_args,
        "command": std::env::args().collect::<Vec<_>>(),
        "interrupted": interrupted,
        "elapsed_s": started.elapsed().as_secs_f64(),
    });
    let _ = writeln!(
        std::io::stdout().lock(),
        "kernel {}, {}, {} CPUs",
        meta["kernel"].as_str().unwrap_or("?"),
        meta["cpu_model"].as_str().unwrap_or("?"),
        meta["cpus"]
    );
    if let Some(path) = &cfg.json {
        let doc = report::json(&rows, meta);
        let text = serde_json::to_string_pretty(&doc)
            .map_err(|e| Error::config(format!("serialize results: {e}")))?;
        std::fs::write(path, text + "\n").context(|| format!("write {}", path.display()))?;
        progress(format_args!("wrote {}", path.display()));
    }
    Ok(!interrupted)
}

/// Runs one workload against one target.
fn measure(
    topo: &Topology,
    cfg: &BenchConfig,
    target: &Target,
    workload: &Workload,
    stop: &Arc<AtomicBool>,
) -> Result<Row> {
    let forwarders = match target {
        Target::Tunfwd {
            engine,
            args,
            hub,
            wg,
            ..
        } => {
            let mut all = cfg.forwarder_args.clone();
            all.extend(args.iter().cloned());
            Some(Running::Pair(ForwarderPair::start(
                topo, engine, &all, *hub, *wg,
            )?))
        }
        Target::Reflect { args, .. } => Some(Running::Reflector(Reflector::start(topo, args)?)),
        Target::WireguardGo => Some(Running::WireguardGo(wggo::WireguardGo::start(topo)?)),
        _ => None,
    };
    let dst = target.dst();
    let sys_before = system_cpu_seconds();
    let fwd_before = forwarders.as_ref().map(Running::cpu_seconds);
    let sched_before = forwarders.as_ref().map(Running::sched);
    let mut row = Row::empty(target.name(), workload.clone());
    match *workload {
        Workload::Udp { packet_len } => {
            let r = traffic::udp_flood(topo, dst, packet_len, cfg.duration, cfg.rate_pps, stop)?;
            row.seconds = r.seconds;
            row.set_flood(&r);
            row.gbps = Some(r.delivered as f64 * packet_len as f64 * 8.0 / r.seconds / 1e9);
            row.packets = Some(r.delivered);
        }
        Workload::Tcp { streams } => {
            let r = traffic::tcp_bulk(topo, dst, streams, cfg.duration, 0, stop)?;
            row.seconds = r.seconds;
            row.gbps = Some(r.bytes as f64 * 8.0 / r.seconds / 1e9);
            row.tcp = Some(r.info);
        }
        Workload::Latency { load } => measure_latency(topo, cfg, target, load, stop, &mut row)?,
    }
    row.sys_cpu_s = system_cpu_seconds() - sys_before;
    if let (Some(pair), Some(before)) = (forwarders, fwd_before) {
        row.fwd_cpu_s = Some(pair.cpu_seconds() - before);
        let before = sched_before.unwrap_or_default();
        row.fwd_sched = pair
            .sched()
            .into_iter()
            .map(|(name, now)| {
                let then = before.iter().find(|(n, _)| *n == name).map(|(_, s)| *s);
                let delta = now.since(&then.unwrap_or_default());
                (name, delta)
            })
            .collect();
        if let Some(c) = pair.stop()? {
            row.fwd_packets = Some(c.tunnel_packets);
            row.fwd_syscalls = Some(c.syscalls);
            row.fwd_drops = Some(c.drops);
            row.udp_rcvbuf_drops = Some(c.udp_rcvbuf_drops);
            row.tun_queue_drops = Some(c.tun_queue_drops);
            row.queue = Some(c.queue);
        }
    }
    Ok(row)
}

/// A latency workload: UDP ping-pong through `target`, alone or under a
/// background load (TCP streams or a UDP flood), into `row`.
fn measure_latency(
    topo: &Topology,
    cfg: &BenchConfig,
    target: &Target,
    load: Load,
    stop: &Arc<AtomicBool>,
    row: &mut Row,
) -> Result<()> {
    let dst = target.dst();
    let background = if load == Load::Idle {
        None
    } else {
        let topo_a = topo.a.try_clone()?;
        let topo_b = topo.b.try_clone()?;
        let stop = stop.clone();
        let duration = cfg.duration + Duration::from_millis(500);
        Some(std::thread::spawn(move || {
            let t = Topology {
                a: topo_a,
                b: topo_b,
            };
            match load {
                Load::Tcp(streams) => {
                    traffic::tcp_bulk(&t, dst, streams, duration, 1, &stop).map(|_| None)
                }
                _ => traffic::udp_flood(&t, dst, 1400, duration, 0, &stop).map(Some),
            }
        }))
    };
    if background.is_some() {
        // Let the load ramp up first.
        std::thread::sleep(Duration::from_millis(300));
    }
    let echo_server = !matches!(target, Target::Reflect { .. });
    let r = traffic::latency(
        topo,
        dst,
        cfg.duration,
        cfg.probe_interval,
        1_000_000,
        echo_server,
        stop,
    )?;
    if let Some(bg) = background {
        let flood = bg
            .join()
            .map_err(|_| Error::config("background load thread panicked"))??;
        if let Some(f) = flood {
            // What the flood offered and what got through.
            row.set_flood(&f);
        }
    }
    let h = &r.rtt_ns;
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1e3;
    row.seconds = cfg.duration.as_secs_f64();
    row.latency = Some(Percentiles {
        p50: us(0.5),
        p90: us(0.9),
        p99: us(0.99),
        p999: us(0.999),
        max: h.max() as f64 / 1e3,
        probes: h.len() + r.lost,
        lost: r.lost,
    });
    Ok(())
}

impl Row {
    /// A row with nothing measured yet.
    fn empty(target: String, workload: Workload) -> Row {
        Row {
            target,
            workload,
            seconds: 0.0,
            offered_pps: None,
            delivered_pps: None,
            loss_pct: None,
            gbps: None,
            latency: None,
            packets: None,
            fwd_cpu_s: None,
            sys_cpu_s: 0.0,
            fwd_syscalls: None,
            fwd_packets: None,
            fwd_drops: None,
            udp_rcvbuf_drops: None,
            tun_queue_drops: None,
            queue: None,
            fwd_sched: Vec::new(),
            tcp: None,
            ratio: None,
        }
    }

    /// A UDP flood's offered and delivered rates and its loss.
    fn set_flood(&mut self, f: &traffic::FloodResult) {
        self.offered_pps = Some(f.offered as f64 / f.seconds);
        self.delivered_pps = Some(f.delivered as f64 / f.seconds);
        self.loss_pct = Some(if f.offered > 0 {
            100.0 * (1.0 - f.delivered.min(f.offered) as f64 / f.offered as f64)
        } else {
            0.0
        });
    }
}

fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_specs() {
        assert_eq!(Target::parse("veth").unwrap(), Target::Veth);
        let t = Target::parse("uring+multishot=off+busy-poll+batch=8").unwrap();
        assert_eq!(
            t,
            Target::Tunfwd {
                spec: "uring+multishot=off+busy-poll+batch=8".into(),
                engine: "uring".into(),
                args: ["--multishot", "off", "--busy-poll", "--batch", "8"]
                    .map(String::from)
                    .to_vec(),
                hub: None,
                wg: false,
            }
        );
        assert!(matches!(
            Target::parse("uring+wg+batch=8").unwrap(),
            Target::Tunfwd { wg: true, .. }
        ));
        assert_eq!(Target::parse("wireguard-go").unwrap(), Target::WireguardGo);
        match Target::parse("poll+hub=10000+batch=8").unwrap() {
            Target::Tunfwd { hub, args, .. } => {
                assert_eq!(hub, Some(10_000));
                assert_eq!(args, ["--batch", "8"]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(t.name(), "uring+multishot=off+busy-poll+batch=8");
        for bad in [
            "nope",
            "veth+batch=1",
            "uring+",
            "uring+--batch=1",
            "uring+hub",
            "uring+hub=1",
            "uring+hub=40000",
            "uring+wg+hub=10",
            "wireguard-go+batch=1",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }
}
