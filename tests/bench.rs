//! `tunfwd bench` end to end (root): the JSON has every figure with plausible
//! values, and nothing (process, namespace, device) is left behind, also when
//! the run is interrupted. These tests check behaviour, never speed.

#![cfg(target_os = "linux")]

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// Interface names in the root namespace (the bench must not add any).
fn root_links() -> Vec<String> {
    let out = run(&["ip", "-o", "link", "show"]);
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            l.split(": ")
                .nth(1)
                .map(|s| s.split('@').next().unwrap_or(s).to_string())
        })
        .collect();
    v.sort();
    v
}

/// Processes whose command line mentions `needle` (forwarders of a bench
/// carry `--netns /proc/<bench pid>/fd/...`).
fn processes_matching(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) {
            found.push(format!("{}: {cmd}", entry.file_name().to_string_lossy()));
        }
    }
    found
}

/// Runs `tunfwd bench ARGS --json FILE` to completion (within `secs`, a
/// hang guard), requires success, and returns the process (for its output
/// and pid) and the JSON document.
fn run_bench(args: &[&str], secs: u64) -> (Proc, Value) {
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let json_path =
        std::env::temp_dir().join(format!("tunfwd-bench-{}-{n}.json", std::process::id()));
    let mut p = Proc::spawn({
        let mut c = Command::new(tunfwd_bin());
        c.arg("bench").args(args).arg("--json").arg(&json_path);
        c
    });
    let status = p
        .wait_timeout(secs)
        .unwrap_or_else(|| panic!("bench {args:?} finished within {secs} s"));
    assert!(status.success(), "bench failed: {status}\n{}", p.stderr());
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json_path);
    (p, doc)
}

fn f(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing or not a number in {v}"))
}

#[test]
fn bench_quick_reports_every_figure_and_cleans_up() {
    if !can_run_kernel_tests("bench_quick_reports_every_figure_and_cleans_up") {
        return;
    }
    let mut targets = vec!["veth", "vxlan", "poll"];
    if uring_usable("bench_quick_reports_every_figure_and_cleans_up") {
        targets.push("uring");
    }
    // udp x2, tcp x2, latency: idle, one stream, two streams, a flood.
    let rows_wanted = targets.len() * 8;
    let links_before = root_links();
    let compare = targets.join(",");
    let (p, doc) = run_bench(&["--quick", "--compare", &compare], 300);
    let pid = p.child.id();

    let out = p.stdout();
    for want in [
        "udp 64 B",
        "udp 1400 B",
        "tcp x1",
        "tcp x2",
        "latency idle",
        "latency loaded",
        "latency loaded x2",
        "latency flood",
    ] {
        assert!(out.contains(want), "table lacks {want:?}:\n{out}");
    }
    assert!(
        p.stderr()
            .contains(&format!("[{rows_wanted}/{rows_wanted}]")),
        "progress lines:\n{}",
        p.stderr()
    );

    let meta = &doc["meta"];
    for key in ["kernel", "cpu_model", "baseline"] {
        assert!(
            meta[key].as_str().is_some_and(|s| !s.is_empty()),
            "meta.{key}: {meta}"
        );
    }
    assert!(meta["cpus"].as_u64().unwrap() >= 1);
    assert_eq!(meta["probe_interval_ms"], serde_json::json!(5.0));
    assert_eq!(meta["targets"], serde_json::json!(targets));
    assert_eq!(meta["interrupted"], Value::Bool(false));

    let rows = doc["results"].as_array().unwrap();
    assert_eq!(rows.len(), rows_wanted, "{targets:?} x 8 workloads");
    for r in rows {
        let target = r["target"].as_str().unwrap();
        let tunfwd = target == "poll" || target == "uring";
        assert!(f(r, "seconds") > 0.0, "{r}");
        // The load generators alone keep the machine busy during a row;
        // an idle latency row (a probe every 5 ms) may cost less than the
        // kernel's tick-based accounting sees.
        if r["load"] == "idle" {
            assert!(f(r, "system_cpu_s") >= 0.0, "{r}");
        } else {
            assert!(f(r, "system_cpu_s") > 0.0, "{r}");
        }
        // Under a flood every probe may be lost: then there is no latency
        // and no ratio, and the row must say all were lost.
        let all_lost =
            r["workload"] == "latency" && r["latency_us"]["probes"] == r["latency_us"]["lost"];
        if all_lost {
            assert_eq!(r["load"], "udp flood", "{r}");
            assert!(
                r["latency_us"]["p50"].is_null() && r["ratio"].is_null(),
                "{r}"
            );
        } else {
            let ratio = f(r, "ratio");
            assert!(ratio > 0.0 && ratio.is_finite(), "{r}");
            if target == "veth" {
                assert!((ratio - 1.0).abs() < 1e-9, "baseline ratio is 1: {r}");
            }
        }
        match r["workload"].as_str().unwrap() {
            "udp" => {
                let (offered, delivered) = (f(r, "offered_pps"), f(r, "delivered_pps"));
                assert!(delivered > 0.0, "{r}");
                assert!(delivered <= offered * 1.0001, "delivered <= offered: {r}");
                let loss = f(r, "loss_pct");
                assert!((0.0..=100.0).contains(&loss), "{r}");
                assert!(f(r, "gbps") > 0.0, "{r}");
            }
            "tcp" => {
                assert!(f(r, "gbps") > 0.0, "{r}");
                // Without --ecn no stream negotiates ECN.
                assert_eq!(r["tcp_info"]["ecn_streams"], 0, "{r}");
            }
            "latency" if all_lost => {}
            "latency" => {
                let l = &r["latency_us"];
                let (p50, p90, p99, p999, max) = (
                    f(l, "p50"),
                    f(l, "p90"),
                    f(l, "p99"),
                    f(l, "p99_9"),
                    f(l, "max"),
                );
                assert!(
                    0.0 < p50 && p50 <= p90 && p90 <= p99 && p99 <= p999 && p999 <= max,
                    "{l}"
                );
                assert!(l["probes"].as_u64().unwrap() > 0, "{l}");
                // Probes were spaced as ping -i spaces them (5 ms by
                // default): never more than the row's time allows.
                let most = f(r, "seconds") * 1000.0 / 5.0 + 2.0;
                assert!(l["probes"].as_u64().unwrap() as f64 <= most, "{l}");
                if r["load"] == "udp flood" {
                    assert!(f(r, "offered_pps") >= f(r, "delivered_pps"), "{r}");
                    assert!(f(r, "delivered_pps") > 0.0, "{r}");
                }
            }
            other => panic!("unknown workload {other}"),
        }
        if tunfwd {
            // Throughput rows move hundreds of thousands of packets: that
            // is CPU time the kernel's tick-based accounting cannot miss.
            // (A latency row's few probes may cost less than one tick.)
            if r["workload"] != "latency" {
                assert!(f(r, "forwarder_cpu_s") > 0.0, "{r}");
            }
            assert!(r["forwarder_packets"].as_u64().unwrap() > 0, "{r}");
            assert!(f(r, "forwarder_syscalls_per_packet") > 0.0, "{r}");
            // The workers measured their visits.
            assert!(
                r["forwarder_queue"]["visit_max_us"].as_u64().unwrap() > 0,
                "{r}"
            );
            // The scheduler saw each side's worker threads (one per CPU by
            // default, up to 8) woken to carry packets: every packet was
            // moved during some run, so runs exist and switched away at
            // least once.
            let sched = r["forwarder_sched"].as_array().unwrap();
            assert_eq!(sched.len(), 2, "{r}");
            for (side, s) in ["a", "b"].iter().zip(sched) {
                assert_eq!(s["process"], *side, "{r}");
                assert_eq!(
                    s["threads"].as_u64(),
                    Some(usable_cpus().min(8) as u64),
                    "one worker per CPU per side by default: {r}"
                );
                assert!(s["runs"].as_u64().unwrap() > 0, "{r}");
                assert!(s["voluntary_switches"].as_u64().unwrap() > 0, "{r}");
                assert!(f(s, "run_s") > 0.0, "{r}");
            }
            assert!(f(r, "forwarder_packets_per_run") > 0.0, "{r}");
            let rq = f(r, "forwarder_runqueue_pct");
            assert!((0.0..=100.0).contains(&rq), "{r}");
        } else {
            assert!(r["forwarder_cpu_s"].is_null(), "{r}");
            assert!(r["forwarder_sched"].is_null(), "{r}");
        }
    }

    assert_eq!(
        root_links(),
        links_before,
        "bench left devices in the root namespace"
    );
    let left = processes_matching(&format!("/proc/{pid}/fd/"));
    assert!(left.is_empty(), "forwarders left running: {left:?}");
}

/// `--ecn`: TCP negotiates ECN at both ends (the sysctl reached the
/// namespaces), and the row says how many streams did.
#[test]
fn bench_ecn_turns_on_ecn_in_both_namespaces() {
    if !can_run_kernel_tests("bench_ecn_turns_on_ecn_in_both_namespaces") {
        return;
    }
    let args = [
        "--compare",
        "veth,poll",
        "--workloads",
        "tcp",
        "--streams",
        "2",
        "--duration",
        "1",
        "--ecn",
    ];
    let (_, doc) = run_bench(&args, 120);
    assert_eq!(doc["meta"]["tcp_ecn"], Value::Bool(true));
    let rows = doc["results"].as_array().unwrap();
    assert_eq!(rows.len(), 4, "{doc}");
    for r in rows {
        let streams = r["streams"].as_u64().unwrap();
        assert_eq!(r["tcp_info"]["ecn_streams"], streams, "{r}");
    }
}

/// `+hub=N`: both forwarders run with N peers from a peers file (the bench
/// fails unless each says it loaded them), the tunnel carries TCP through
/// the table, and the files are gone afterwards.
#[test]
fn bench_hub_target_carries_traffic_through_many_peers() {
    if !can_run_kernel_tests("bench_hub_target_carries_traffic_through_many_peers") {
        return;
    }
    let args = [
        "--compare",
        "poll+hub=10000",
        "--workloads",
        "tcp,latency",
        "--streams",
        "2",
        "--duration",
        "1",
    ];
    let (p, doc) = run_bench(&args, 180);
    let rows = doc["results"].as_array().unwrap();
    let tcp: Vec<&Value> = rows.iter().filter(|r| r["workload"] == "tcp").collect();
    assert_eq!(tcp.len(), 2, "{doc}");
    for r in tcp {
        assert!(f(r, "gbps") > 0.0, "{r}");
        assert!(f(r, "forwarder_packets") > 1000.0, "{r}");
    }
    let dir = std::env::temp_dir().join(format!("tunfwd-bench-hub-{}", p.child.id()));
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[test]
fn bench_interrupted_cleans_up() {
    if !can_run_kernel_tests("bench_interrupted_cleans_up") {
        return;
    }
    let links_before = root_links();
    let mut p = Proc::spawn({
        let mut c = Command::new(tunfwd_bin());
        c.args([
            "bench",
            "--compare",
            "veth,poll",
            "--workloads",
            "tcp",
            "--duration",
            "3",
        ])
        .stdin(Stdio::null());
        c
    });
    let pid = p.child.id();
    // Interrupt while the forwarders run.
    p.wait_for_stderr("poll tcp x1");
    // Interrupt once the forwarders run.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while processes_matching(&format!("/proc/{pid}/fd/")).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "forwarders should be running now"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = p.wait_timeout(30).expect("bench stopped after SIGINT");
    assert_eq!(
        status.code(),
        Some(130),
        "exit status: {status}\n{}",
        p.stderr()
    );
    assert!(p.stderr().contains("SIGINT received"), "{}", p.stderr());
    // The forwarders stop with their parent (a parent-death signal, which
    // arrives asynchronously): they must be gone within a hang guard.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut left = processes_matching(&format!("/proc/{pid}/fd/"));
    while !left.is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        left = processes_matching(&format!("/proc/{pid}/fd/"));
    }
    assert!(left.is_empty(), "forwarders left running: {left:?}");
    assert_eq!(
        root_links(),
        links_before,
        "bench left devices in the root namespace"
    );
}

#[test]
fn bench_rejects_bad_flags() {
    for (args, want) in [
        (
            vec!["bench", "--compare", "veth,nope"],
            "unknown bench target",
        ),
        (vec!["bench", "--sizes", "20"], "--sizes 20 is out of range"),
        (
            vec!["bench", "--probe-interval", "1001"],
            "--probe-interval 1001 is out of range 0..=1000 ms",
        ),
        (
            vec!["bench", "--probe-interval=-1"],
            "--probe-interval -1 is out of range",
        ),
        (
            vec!["bench", "--compare", "veth", "--baseline", "poll"],
            "--baseline poll is not one of --compare",
        ),
    ] {
        let out = Command::new(tunfwd_bin())
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// The reflector as a single-host latency far end: only the idle latency
/// workload runs for it, its probes are answered, and it stops with the bench.
#[test]
fn bench_reflect_far_end() {
    if !can_run_kernel_tests("bench_reflect_far_end") {
        return;
    }
    let args = [
        "--compare",
        "veth,reflect",
        "--workloads",
        "latency",
        "--duration",
        "0.5",
    ];
    let (p, doc) = run_bench(&args, 120);
    let pid = p.child.id();
    let rows = doc["results"].as_array().unwrap();
    let labels: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{} {}",
                r["target"].as_str().unwrap(),
                r["label"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        labels,
        [
            "veth latency idle",
            "veth latency loaded",
            "veth latency loaded x4",
            "veth latency flood",
            "reflect latency idle"
        ]
    );
    let r = &rows[4];
    assert!(f(&r["latency_us"], "p50") > 0.0, "{r}");
    assert!(r["forwarder_packets"].as_u64().unwrap() > 0, "{r}");
    let left = processes_matching(&format!("/proc/{pid}/fd/"));
    assert!(left.is_empty(), "processes left running: {left:?}");
}
