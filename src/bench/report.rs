//! Bench results: one row per (target, workload), ratios to a baseline
//! measured in the same run, a terminal table and a JSON document.

use std::fmt::Write as _;

use serde_json::{Value, json};

use super::sched::Sched;

/// What a row measured.
#[derive(Clone, Debug, PartialEq)]
pub enum Workload {
    /// UDP flood of IP packets of this many bytes.
    Udp { packet_len: usize },
    /// TCP bulk with this many parallel streams.
    Tcp { streams: usize },
    /// UDP request/response probes, idle or under a load.
    Latency { load: Load },
}

/// What runs through the tunnel, in the probes' direction, while latency
/// is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Load {
    Idle,
    /// TCP bulk with this many streams.
    Tcp(usize),
    /// A UDP flood of 1400-byte packets as fast as the generator goes
    /// (two to three times what a tunnel carries here).
    Flood,
}

impl Workload {
    pub fn label(&self) -> String {
        match self {
            Workload::Udp { packet_len } => format!("udp {packet_len} B"),
            Workload::Tcp { streams } => format!("tcp x{streams}"),
            Workload::Latency { load: Load::Idle } => "latency idle".into(),
            Workload::Latency { load: Load::Tcp(1) } => "latency loaded".into(),
            Workload::Latency { load: Load::Tcp(n) } => format!("latency loaded x{n}"),
            Workload::Latency { load: Load::Flood } => "latency flood".into(),
        }
    }
}

/// Round-trip percentiles in microseconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub probes: u64,
    pub lost: u64,
}

/// The forwarders' own view of their queues during a workload.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueFigures {
    /// The longest visit of a worker to one direction (microseconds).
    pub visit_max_us: u64,
    /// The longest a packet waited in a forwarder's queues (its flow
    /// queues, or with `--aqm codel` its receive buffer).
    pub queue_delay_max_us: u64,
    /// The most packets one side's flow queues held.
    pub queue_max: u64,
    /// CoDel's signals: CE marks and drops.
    pub aqm_marks: u64,
    pub aqm_drops: u64,
    /// Overload drops from the fattest flow.
    pub overload_drops: u64,
}

impl QueueFigures {
    /// Both forwarders' figures: the larger of the maxima, the sum of the
    /// counts.
    pub fn merged(&self, o: &QueueFigures) -> QueueFigures {
        QueueFigures {
            visit_max_us: self.visit_max_us.max(o.visit_max_us),
            queue_delay_max_us: self.queue_delay_max_us.max(o.queue_delay_max_us),
            queue_max: self.queue_max.max(o.queue_max),
            aqm_marks: self.aqm_marks + o.aqm_marks,
            aqm_drops: self.aqm_drops + o.aqm_drops,
            overload_drops: self.overload_drops + o.overload_drops,
        }
    }
}

impl Percentiles {
    /// Probes that got an answer: the percentiles describe these only.
    pub fn answered(&self) -> u64 {
        self.probes.saturating_sub(self.lost)
    }
}

/// One measured (target, workload).
#[derive(Clone, Debug)]
pub struct Row {
    pub target: String,
    pub workload: Workload,
    pub seconds: f64,
    pub offered_pps: Option<f64>,
    pub delivered_pps: Option<f64>,
    pub loss_pct: Option<f64>,
    pub gbps: Option<f64>,
    pub latency: Option<Percentiles>,
    /// Packets delivered end to end (UDP) or crossing the tunnel (tunfwd).
    pub packets: Option<u64>,
    /// CPU seconds of the forwarder processes (tunfwd targets only).
    pub fwd_cpu_s: Option<f64>,
    /// CPU seconds of the whole machine during the workload.
    pub sys_cpu_s: f64,
    /// System calls both forwarders made, from their own counters.
    pub fwd_syscalls: Option<u64>,
    /// Packets both forwarders moved, from their own counters.
    pub fwd_packets: Option<u64>,
    /// Drops both forwarders counted.
    pub fwd_drops: Option<u64>,
    /// The kernel's drops at the forwarders' sockets and TUN queues.
    pub udp_rcvbuf_drops: Option<u64>,
    pub tun_queue_drops: Option<u64>,
    /// How the forwarders' queues and visits fared (tunfwd targets only).
    pub queue: Option<QueueFigures>,
    /// How the scheduler treated each forwarder's workers (tunfwd's
    /// `tunfwd-qN` threads; every thread of wireguard-go), by process.
    pub fwd_sched: Vec<(String, Sched)>,
    /// TCP workloads: what the senders' kernels reported.
    pub tcp: Option<super::traffic::TcpStats>,
    /// Against the baseline's row of the same workload.
    pub ratio: Option<f64>,
}

impl Row {
    /// The figure ratios compare: delivered packets/s, Gbit/s, or p50.
    fn headline(&self) -> Option<f64> {
        match self.workload {
            Workload::Udp { .. } => self.delivered_pps,
            Workload::Tcp { .. } => self.gbps,
            Workload::Latency { .. } => self.latency.filter(|l| l.answered() > 0).map(|l| l.p50),
        }
    }

    pub fn fwd_cpu_s_per_mpkt(&self) -> Option<f64> {
        match (self.fwd_cpu_s, self.fwd_packets) {
            (Some(c), Some(p)) if p > 0 => Some(c / p as f64 * 1e6),
            _ => None,
        }
    }

    pub fn sys_cpu_s_per_mpkt(&self) -> Option<f64> {
        match self.packets {
            Some(p) if p > 0 => Some(self.sys_cpu_s / p as f64 * 1e6),
            _ => None,
        }
    }

    /// All forwarders' scheduler figures summed.
    pub fn sched_total(&self) -> Option<Sched> {
        (!self.fwd_sched.is_empty()).then(|| {
            self.fwd_sched
                .iter()
                .fold(Sched::default(), |acc, (_, s)| acc.plus(s))
        })
    }

    /// The share of the workload's time the forwarders' workers spent
    /// runnable but waiting for a CPU, per worker (percent).
    pub fn runqueue_pct(&self) -> Option<f64> {
        let s = self.sched_total()?;
        (s.threads > 0 && self.seconds > 0.0)
            .then(|| 100.0 * s.wait_ns as f64 / 1e9 / self.seconds / s.threads as f64)
    }

    /// Context switches per tunnel packet.
    pub fn switches_per_packet(&self) -> Option<f64> {
        match (self.sched_total(), self.fwd_packets) {
            (Some(s), Some(p)) if p > 0 => Some(s.switches() as f64 / p as f64),
            _ => None,
        }
    }

    /// Tunnel packets per run on a CPU: the batch a wakeup carries.
    pub fn packets_per_run(&self) -> Option<f64> {
        match (self.sched_total(), self.fwd_packets) {
            (Some(s), Some(p)) if s.runs > 0 => Some(p as f64 / s.runs as f64),
            _ => None,
        }
    }

    pub fn syscalls_per_packet(&self) -> Option<f64> {
        match (self.fwd_syscalls, self.fwd_packets) {
            (Some(s), Some(p)) if p > 0 => Some(s as f64 / p as f64),
            _ => None,
        }
    }
}

/// Fills `ratio` of every row against the `baseline` target's row of the
/// same workload.
pub fn set_ratios(rows: &mut [Row], baseline: &str) {
    let base: Vec<(Workload, Option<f64>)> = rows
        .iter()
        .filter(|r| r.target == baseline)
        .map(|r| (r.workload.clone(), r.headline()))
        .collect();
    for r in rows.iter_mut() {
        let b = base
            .iter()
            .find(|(w, _)| *w == r.workload)
            .and_then(|(_, v)| *v);
        r.ratio = match (r.headline(), b) {
            (Some(v), Some(b)) if b > 0.0 => Some(v / b),
            _ => None,
        };
    }
}

fn count(v: Option<u64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map(|v| format!("{v:.prec$}"))
        .unwrap_or_else(|| "-".into())
}

/// The terminal table: throughput rows, then latency rows.
pub fn table(rows: &[Row], baseline: &str) -> String {
    let mut s = String::new();
    let tw = rows
        .iter()
        .map(|r| r.target.len())
        .max()
        .unwrap_or(0)
        .max(10);
    let _ = writeln!(
        s,
        "{:<15} {:<tw$} {:>10} {:>10} {:>8} {:>7} {:>7} {:>10} {:>10} {:>9} {:>8} {:>8} {:>8} {:>8}",
        "workload",
        "target",
        "offer kpps",
        "deliv kpps",
        "Gbit/s",
        "loss%",
        "ratio",
        "fwdCPU s/M",
        "sysCPU s/M",
        "calls/pkt",
        "retrans",
        "sockDrop",
        "tunqDrop",
        "fwdDrop"
    );
    for r in rows
        .iter()
        .filter(|r| !matches!(r.workload, Workload::Latency { .. }))
    {
        let _ = writeln!(
            s,
            "{:<15} {:<tw$} {:>10} {:>10} {:>8} {:>7} {:>7} {:>10} {:>10} {:>9} {:>8} {:>8} {:>8} {:>8}",
            r.workload.label(),
            r.target,
            opt(r.offered_pps.map(|v| v / 1e3), 1),
            opt(r.delivered_pps.map(|v| v / 1e3), 1),
            opt(r.gbps, 3),
            opt(r.loss_pct, 1),
            opt(r.ratio, 3),
            opt(r.fwd_cpu_s_per_mpkt(), 2),
            opt(r.sys_cpu_s_per_mpkt(), 2),
            opt(r.syscalls_per_packet(), 2),
            count(r.tcp.map(|t| t.retransmits)),
            count(r.udp_rcvbuf_drops),
            count(r.tun_queue_drops),
            count(r.fwd_drops),
        );
    }
    let lat: Vec<&Row> = rows.iter().filter(|r| r.latency.is_some()).collect();
    if !lat.is_empty() {
        let _ = writeln!(
            s,
            "\n{:<18} {:<tw$} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8} {:>6} {:>7} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9} {:>6} {:>7} {:>7}",
            "workload",
            "target",
            "p50 us",
            "p90 us",
            "p99 us",
            "p99.9 us",
            "max us",
            "probes",
            "lost",
            "ratio",
            "sockDrop",
            "tunqDrop",
            "fwdDrop",
            "aqmMark",
            "visitMax",
            "qDelayMax",
            "rqWait us",
            "rq%",
            "csw/pkt",
            "pkt/run"
        );
        for r in lat {
            let l = r.latency.unwrap_or_default();
            let p = |v: f64| opt((l.answered() > 0).then_some(v), 1);
            let _ = writeln!(
                s,
                "{:<18} {:<tw$} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8} {:>6} {:>7} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9} {:>6} {:>7} {:>7}",
                r.workload.label(),
                r.target,
                p(l.p50),
                p(l.p90),
                p(l.p99),
                p(l.p999),
                p(l.max),
                l.probes,
                l.lost,
                opt(r.ratio, 3),
                count(r.udp_rcvbuf_drops),
                count(r.tun_queue_drops),
                count(r.fwd_drops),
                count(r.queue.map(|q| q.aqm_marks)),
                count(r.queue.map(|q| q.visit_max_us)),
                count(r.queue.map(|q| q.queue_delay_max_us)),
                opt(r.sched_total().and_then(|s| s.wait_per_run_us()), 1),
                opt(r.runqueue_pct(), 1),
                opt(r.switches_per_packet(), 3),
                opt(r.packets_per_run(), 1),
            );
        }
    }
    let _ = writeln!(
        s,
        "\nratio: against '{baseline}' in this run (delivered pps for udp, Gbit/s for tcp, p50 for latency).\n\
         fwdCPU s/M: forwarder CPU seconds per million tunnel packets; sysCPU s/M: whole-machine CPU \
         seconds per million delivered packets; calls/pkt: forwarder system calls per tunnel packet.\n\
         retrans: TCP segments the senders retransmitted; sockDrop, tunqDrop: datagrams the kernel \
         dropped at the forwarders' full UDP receive buffers and packets it dropped at their full TUN \
         queues; fwdDrop: tunfwd's own drops (both forwarders).\n\
         Latency rows: loaded = one TCP stream, loaded xN = N streams, flood = 1400-byte UDP as fast \
         as the generator goes, all in the probes' direction; aqmMark: CoDel's CE marks (its drops \
         and overload drops are in fwdDrop); visitMax: a forwarder's longest visit to one direction, \
         qDelayMax: the longest a packet waited in a forwarder's queues (its flow queues, since the \
         read or the arrival in the socket; with --aqm codel the receive buffer) (us).\n\
         Scheduler (the forwarders' worker threads, /proc/PID/task/TID/schedstat and status): rqWait: \
         the mean time a worker waited on a run queue each time it got a CPU (woken, or preempted \
         and resumed) (us); rq%: the share of the run a worker spent runnable but not running; \
         csw/pkt: context switches per tunnel packet; pkt/run: tunnel packets per run on a CPU \
         (the batch one wakeup carries). Per forwarder in the JSON."
    );
    s
}

/// The whole run as JSON.
pub fn json(rows: &[Row], meta: Value) -> Value {
    let results: Vec<Value> = rows
        .iter()
        .map(|r| {
            let (kind, size, streams, load) = match r.workload {
                Workload::Udp { packet_len } => ("udp", Some(packet_len), None, None),
                Workload::Tcp { streams } => ("tcp", None, Some(streams), None),
                Workload::Latency { load } => ("latency", None, None, Some(load)),
            };
            let (loaded, load_streams, load) = match load {
                None => (None, None, None),
                Some(Load::Idle) => (Some(false), None, Some("idle")),
                Some(Load::Tcp(n)) => (Some(true), Some(n), Some("tcp")),
                Some(Load::Flood) => (Some(true), None, Some("udp flood")),
            };
            json!({
                "target": r.target,
                "workload": kind,
                "label": r.workload.label(),
                "packet_len": size,
                "streams": streams,
                "loaded": loaded,
                "load": load,
                "load_streams": load_streams,
                "seconds": r.seconds,
                "offered_pps": r.offered_pps,
                "delivered_pps": r.delivered_pps,
                "loss_pct": r.loss_pct,
                "gbps": r.gbps,
                // Every probe lost (an overload can do that): no percentiles.
                "latency_us": r.latency.map(|l| {
                    let p = |v: f64| (l.answered() > 0).then_some(v);
                    json!({
                        "p50": p(l.p50), "p90": p(l.p90), "p99": p(l.p99), "p99_9": p(l.p999),
                        "max": p(l.max), "probes": l.probes, "lost": l.lost,
                    })
                }),
                "packets": r.packets,
                "forwarder_cpu_s": r.fwd_cpu_s,
                "forwarder_cpu_s_per_mpkt": r.fwd_cpu_s_per_mpkt(),
                "system_cpu_s": r.sys_cpu_s,
                "system_cpu_s_per_mpkt": r.sys_cpu_s_per_mpkt(),
                "forwarder_packets": r.fwd_packets,
                "forwarder_syscalls": r.fwd_syscalls,
                "forwarder_syscalls_per_packet": r.syscalls_per_packet(),
                "forwarder_drops": r.fwd_drops,
                "kernel_drops": json!({
                    "udp_rcvbuf": r.udp_rcvbuf_drops,
                    "tun_queue": r.tun_queue_drops,
                }),
                "forwarder_queue": r.queue.map(|q| json!({
                    "visit_max_us": q.visit_max_us,
                    "queue_delay_max_us": q.queue_delay_max_us,
                    "queue_max": q.queue_max,
                    "aqm_marks": q.aqm_marks,
                    "aqm_drops": q.aqm_drops,
                    "overload_drops": q.overload_drops,
                })),
                "forwarder_sched": (!r.fwd_sched.is_empty()).then(|| {
                    r.fwd_sched
                        .iter()
                        .map(|(name, s)| json!({
                            "process": name,
                            "threads": s.threads,
                            "run_s": s.run_ns as f64 / 1e9,
                            "runqueue_wait_s": s.wait_ns as f64 / 1e9,
                            "runs": s.runs,
                            "runqueue_wait_per_run_us": s.wait_per_run_us(),
                            "voluntary_switches": s.voluntary,
                            "involuntary_switches": s.involuntary,
                        }))
                        .collect::<Vec<_>>()
                }),
                "forwarder_runqueue_pct": r.runqueue_pct(),
                "forwarder_switches_per_packet": r.switches_per_packet(),
                "forwarder_packets_per_run": r.packets_per_run(),
                "tcp_info": r.tcp.map(|t| json!({
                    "retransmits": t.retransmits,
                    "reord_seen": t.reord_seen,
                    "dsack_dups": t.dsack_dups,
                    "rtt_us": t.rtt_us,
                    "cwnd": t.cwnd,
                    "rwnd_limited_us": t.rwnd_limited_us,
                    "sndbuf_limited_us": t.sndbuf_limited_us,
                    "busy_us": t.busy_us,
                    "ecn_streams": t.ecn_streams,
                    "delivered_ce": t.delivered_ce,
                })),
                "ratio": r.ratio,
            })
        })
        .collect();
    json!({ "meta": meta, "results": results })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(target: &str, w: Workload, head: f64) -> Row {
        Row {
            target: target.into(),
            workload: w.clone(),
            seconds: 1.0,
            offered_pps: Some(head * 2.0),
            delivered_pps: matches!(w, Workload::Udp { .. }).then_some(head),
            loss_pct: Some(50.0),
            gbps: matches!(w, Workload::Tcp { .. }).then_some(head),
            latency: matches!(w, Workload::Latency { .. }).then_some(Percentiles {
                p50: head,
                probes: 10,
                ..Default::default()
            }),
            packets: Some(1000),
            fwd_cpu_s: Some(0.5),
            sys_cpu_s: 1.0,
            fwd_syscalls: Some(2000),
            fwd_packets: Some(1000),
            fwd_drops: Some(0),
            udp_rcvbuf_drops: None,
            tun_queue_drops: None,
            queue: None,
            fwd_sched: Vec::new(),
            tcp: None,
            ratio: None,
        }
    }

    #[test]
    fn ratios_per_workload() {
        let udp = Workload::Udp { packet_len: 64 };
        let tcp = Workload::Tcp { streams: 1 };
        let mut rows = vec![
            row("veth", udp.clone(), 100.0),
            row("poll", udp.clone(), 25.0),
            row("veth", tcp.clone(), 10.0),
            row("poll", tcp.clone(), 5.0),
            row("poll", Workload::Latency { load: Load::Idle }, 40.0),
        ];
        set_ratios(&mut rows, "veth");
        assert_eq!(rows[0].ratio, Some(1.0));
        assert_eq!(rows[1].ratio, Some(0.25));
        assert_eq!(rows[3].ratio, Some(0.5));
        assert_eq!(rows[4].ratio, None, "no baseline row for it");
        assert_eq!(rows[1].fwd_cpu_s_per_mpkt(), Some(500.0));
        assert_eq!(rows[1].syscalls_per_packet(), Some(2.0));
        let t = table(&rows, "veth");
        assert!(t.contains("udp 64 B"), "{t}");
        assert!(t.contains("latency idle"), "{t}");
        let j = json(&rows, json!({"kernel": "x"}));
        assert_eq!(j["results"][1]["ratio"], json!(0.25));
        assert_eq!(j["results"][4]["latency_us"]["p50"], json!(40.0));

        // Every probe lost: no percentiles, no ratio, "-" in the table.
        let mut flood = vec![
            row("veth", Workload::Latency { load: Load::Flood }, 20.0),
            row("poll", Workload::Latency { load: Load::Flood }, 0.0),
        ];
        if let Some(l) = &mut flood[1].latency {
            l.lost = l.probes;
        }
        set_ratios(&mut flood, "veth");
        assert_eq!(flood[1].ratio, None);
        let j = json(&flood, json!({}));
        assert!(j["results"][1]["latency_us"]["p50"].is_null(), "{j}");
        assert_eq!(j["results"][1]["latency_us"]["lost"], json!(10));
        let t = table(&flood, "veth");
        let line = t
            .lines()
            .find(|l| l.contains("latency flood") && l.contains("poll"));
        assert!(
            line.is_some_and(|l| l.split_whitespace().nth(3) == Some("-")),
            "{t}"
        );
    }

    #[test]
    fn scheduler_figures_per_forwarder_and_summed() {
        let mut r = row("uring", Workload::Latency { load: Load::Tcp(1) }, 800.0);
        r.seconds = 2.0;
        let side = |wait_ns, runs| Sched {
            threads: 1,
            run_ns: 1_000_000_000,
            wait_ns,
            runs,
            voluntary: runs - 100,
            involuntary: 100,
        };
        r.fwd_sched = vec![
            ("a".into(), side(400_000_000, 1000)),
            ("b".into(), side(200_000_000, 500)),
        ];
        let total = r.sched_total().unwrap();
        assert_eq!(total.wait_per_run_us(), Some(400.0));
        // 0.6 s of waiting over 2 s and two workers.
        assert!((r.runqueue_pct().unwrap() - 15.0).abs() < 1e-9);
        assert_eq!(r.switches_per_packet(), Some(1.5));
        assert_eq!(r.packets_per_run(), Some(1000.0 / 1500.0));
        let t = table(std::slice::from_ref(&r), "uring");
        let line = t.lines().find(|l| l.starts_with("latency loaded")).unwrap();
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            cols[cols.len() - 4..],
            ["400.0", "15.0", "1.500", "0.7"],
            "{t}"
        );
        let j = json(std::slice::from_ref(&r), json!({}));
        let f = &j["results"][0]["forwarder_sched"];
        assert_eq!(f[1]["process"], json!("b"));
        assert_eq!(f[1]["runqueue_wait_per_run_us"], json!(400.0));
        assert_eq!(f[0]["involuntary_switches"], json!(100));
        // A target without forwarders: no figures, "-" in the table.
        let bare = row("vxlan", Workload::Latency { load: Load::Idle }, 60.0);
        assert_eq!(bare.sched_total(), None);
        assert!(json(&[bare], json!({}))["results"][0]["forwarder_sched"].is_null());
    }
}
