//! Faults, each against the real kernel under both engines: the peer not
//! running yet, the peer restarting mid-transfer, the underlay link going
//! down and up, the TUN device deleted underneath, SIGTERM under full load,
//! and starved resources. tunfwd must ride out what it can (without a
//! restart, without losing the transfer) and stop cleanly with a clear
//! message when it cannot: never a panic, a hang or a spin. Needs root.
//!
//! Time limits here are hang guards (seconds, generous), not performance
//! bounds; the measured times are printed.

#![cfg(target_os = "linux")]

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;

/// CPU seconds (user + system) used so far by `pid`.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

/// Waits up to `secs` for the process to exit (a hang guard); returns the
/// status and the time it took.
fn exit_within(p: &mut Proc, secs: u64) -> (std::process::ExitStatus, Duration) {
    let t = Instant::now();
    match p.wait_timeout(secs) {
        Some(s) => (s, t.elapsed()),
        None => panic!(
            "no exit within {secs} s (hang)\nstdout:\n{}\nstderr:\n{}",
            p.stdout(),
            p.stderr()
        ),
    }
}

/// A verified transfer on its own thread, so the test can break things
/// while it runs.
/// A verified transfer from a to b of `bytes`, paced to 64 MB/s so that it
/// runs for a while, in the background; `progress` counts what b received.
fn paced_transfer(
    topo: &Topology,
    bytes: u64,
    progress: Arc<std::sync::atomic::AtomicU64>,
) -> std::thread::JoinHandle<u64> {
    let dst: SocketAddr = format!("{OVERLAY_B}:7000").parse().unwrap();
    let (from, to) = (topo.a.name.clone(), topo.b.name.clone());
    std::thread::spawn(move || {
        let from = Netns::existing(&from);
        let to = Netns::existing(&to);
        verified_tcp_transfer_observed(&from, &to, dst, bytes, Some(progress), Some(64 << 20))
    })
}

/// Waits until `progress` reaches `at_least` bytes (30 s hang guard).
fn wait_progress(progress: &std::sync::atomic::AtomicU64, at_least: u64, what: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = progress.load(Ordering::Relaxed);
        if n >= at_least {
            return n;
        }
        assert!(Instant::now() < deadline, "{what}: {n} of {at_least} bytes");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn transfer_in_background(topo: &Topology, to_b: bool, bytes: u64) -> std::thread::JoinHandle<u64> {
    let (from, to, dst) = if to_b {
        (&topo.a, &topo.b, format!("{OVERLAY_B}:7000"))
    } else {
        (&topo.b, &topo.a, format!("{OVERLAY_A}:7000"))
    };
    let dst: SocketAddr = dst.parse().unwrap();
    // Netns is not Send: hand the names to a thread that rebuilds handles.
    let (from, to) = (from.name.clone(), to.name.clone());
    std::thread::spawn(move || {
        let from = Netns::existing(&from);
        let to = Netns::existing(&to);
        verified_tcp_transfer(&from, &to, dst, bytes)
    })
}

#[test]
fn peer_not_running_then_starting() {
    if !can_run_kernel_tests("peer_not_running_then_starting") {
        return;
    }
    for engine in engines("peer_not_running_then_starting") {
        let topo = Topology::new();
        let extra = ["--engine", engine];
        let mut a = Proc::tunfwd(&topo.a, &tunnel_args(true, &extra));
        let unreach_before = kernel_counter(&topo.a, "/proc/net/snmp", "Icmp", "InDestUnreachs");
        // Nobody listens on b's port: the kernel there answers port
        // unreachable, and the pings fail.
        assert!(!topo.a.ping(OVERLAY_B), "{engine}: ping without a peer");
        let unreach =
            kernel_counter(&topo.a, "/proc/net/snmp", "Icmp", "InDestUnreachs") - unreach_before;
        assert!(unreach >= 1, "{engine}: no ICMP port unreachable came back");
        assert!(a.child.try_wait().unwrap().is_none(), "{engine}: a exited");
        // The peer starts: traffic flows, a was never restarted.
        let mut b = Proc::tunfwd(&topo.b, &tunnel_args(false, &extra));
        assert!(topo.a.ping(OVERLAY_B), "{engine}: ping once the peer runs");
        let dst: SocketAddr = format!("{OVERLAY_B}:7000").parse().unwrap();
        verified_tcp_transfer(&topo.a, &topo.b, dst, 8 << 20);
        assert!(a.terminate().success());
        assert!(b.terminate().success());
        let out = a.stdout();
        eprintln!("{engine}: {unreach} port unreachable(s) while the peer was down\n{out}");
        // The kernel's port unreachables reached tunfwd (IP_RECVERR) and
        // were counted; the echo requests themselves left.
        let counted = stat(&out, "summary total", "peer_unreachable");
        // (Other datagrams sent before b started, such as IPv6 router
        // solicitations, may add to it.)
        assert!(counted >= 1, "{engine}: {counted} of {unreach}\n{out}");
    }
}

#[test]
fn peer_restart_mid_transfer_keeps_the_tcp_stream() {
    if !can_run_kernel_tests("peer_restart_mid_transfer_keeps_the_tcp_stream") {
        return;
    }
    for engine in engines("peer_restart_mid_transfer_keeps_the_tcp_stream") {
        let topo = Topology::new();
        let extra = ["--engine", engine];
        let mut a = Proc::tunfwd(&topo.a, &tunnel_args(true, &extra));
        let mut b = Proc::tunfwd(&topo.b, &tunnel_args(false, &extra));
        const TOTAL: u64 = 96 << 20;
        let progress = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let transfer = paced_transfer(&topo, TOTAL, progress.clone());
        // The fault meets a running transfer: some bytes arrived, not all.
        let before = wait_progress(&progress, 8 << 20, "transfer started");
        assert!(b.terminate().success(), "{engine}: {}", b.stderr());
        let at_fault = progress.load(Ordering::Relaxed);
        assert!(
            at_fault < TOTAL,
            "{engine}: the transfer was over before the fault"
        );
        // Down for a second: the device (and its address) are gone.
        std::thread::sleep(Duration::from_secs(1));
        let _b2 = Proc::tunfwd(&topo.b, &tunnel_args(false, &extra));
        let bytes = transfer.join().expect("transfer survived the restart");
        assert_eq!(bytes, TOTAL);
        assert!(a.terminate().success());
        // The outage showed: the kernel reported the peer's port closed.
        let out = a.stdout();
        assert!(
            stat(&out, "summary total", "peer_unreachable") > 0,
            "{engine}: {out}"
        );
        eprintln!(
            "{engine}: 96 MiB verified across a peer restart ({before} bytes before it, {at_fault} at it)"
        );
    }
}

#[test]
fn underlay_link_down_and_up() {
    if !can_run_kernel_tests("underlay_link_down_and_up") {
        return;
    }
    for engine in engines("underlay_link_down_and_up") {
        let topo = Topology::new();
        let extra = ["--engine", engine];
        let mut a = Proc::tunfwd(&topo.a, &tunnel_args(true, &extra));
        let _b = Proc::tunfwd(&topo.b, &tunnel_args(false, &extra));
        const TOTAL: u64 = 96 << 20;
        let progress = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let transfer = paced_transfer(&topo, TOTAL, progress.clone());
        wait_progress(&progress, 8 << 20, "transfer started");
        topo.a.ip(&["link", "set", "veth0", "down"]);
        let at_fault = progress.load(Ordering::Relaxed);
        assert!(
            at_fault < TOTAL,
            "{engine}: the transfer was over before the fault"
        );
        std::thread::sleep(Duration::from_secs(1));
        topo.a.ip(&["link", "set", "veth0", "up"]);
        let bytes = transfer.join().expect("transfer survived the link flap");
        assert_eq!(bytes, TOTAL);
        assert!(topo.a.ping(OVERLAY_B), "{engine}: ping after the flap");
        assert!(a.terminate().success());
        // The outage showed: sends failed while the link was down.
        let out = a.stdout();
        let failed = stat(&out, "summary total", "send_failed")
            + stat(&out, "summary total", "peer_unreachable");
        assert!(failed > 0, "{engine}: the outage left no trace\n{out}");
        eprintln!("{engine}: link flap at {at_fault} of {TOTAL} bytes\n{out}");
    }
}

#[test]
fn tun_deleted_underneath_exits_with_a_clear_error() {
    if !can_run_kernel_tests("tun_deleted_underneath_exits_with_a_clear_error") {
        return;
    }
    for engine in engines("tun_deleted_underneath_exits_with_a_clear_error") {
        let topo = Topology::new();
        let mut a = Proc::tunfwd(&topo.a, &tunnel_args(true, &["--engine", engine]));
        let _b = Proc::tunfwd(&topo.b, &tunnel_args(false, &["--engine", engine]));
        assert!(topo.a.ping(OVERLAY_B));
        let pid = a.child.id();
        let cpu_before = cpu_secs(pid);
        topo.a.ip(&["link", "del", "tun0"]);
        let (status, took) = exit_within(&mut a, 10);
        let cpu = cpu_secs(pid).max(cpu_before) - cpu_before;
        let err = a.stderr();
        eprintln!("{engine}: exited {status} after {took:?}, {cpu:.2} CPU s: {err}");
        assert_eq!(status.code(), Some(1), "{engine}: exit code: {err}");
        // No spinning on the dead queue: a spinning worker would use about
        // as much CPU as the time it took to exit (10 ms clock ticks).
        assert!(
            cpu <= took.as_secs_f64() / 2.0 + 0.02,
            "{engine}: {cpu:.2} CPU s in the {took:?} before exiting"
        );
        assert!(
            err.contains("tun0") && err.contains("deleted"),
            "{engine}: {err}"
        );
        assert!(!err.contains("panicked"), "{engine}: {err}");
        assert!(a.stdout().contains("summary total"), "{engine}: no summary");
    }
}

/// SIGTERM while both directions are saturated (a UDP flood each way and
/// TCP): a clean exit, the summary, the device gone.
#[test]
fn sigterm_under_full_load() {
    if !can_run_kernel_tests("sigterm_under_full_load") {
        return;
    }
    for engine in engines("sigterm_under_full_load") {
        let topo = Topology::new();
        let mut a = Proc::tunfwd(&topo.a, &tunnel_args(true, &["--engine", engine]));
        let _b = Proc::tunfwd(&topo.b, &tunnel_args(false, &["--engine", engine]));
        let stop = Arc::new(AtomicBool::new(false));
        let mut floods = Vec::new();
        for (ns, from, to) in [
            (&topo.a, OVERLAY_A, OVERLAY_B),
            (&topo.b, OVERLAY_B, OVERLAY_A),
        ] {
            let stop = stop.clone();
            let (from, to) = (from.to_string(), to.to_string());
            floods.push(ns.spawn(move || {
                let s = UdpSocket::bind(format!("{from}:0")).unwrap();
                let pkt = [0u8; 1200];
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if s.send_to(&pkt, format!("{to}:9")).is_ok() {
                        n += 1;
                    }
                }
                n
            }));
        }
        let _tcp = transfer_in_background(&topo, true, 1 << 30);
        std::thread::sleep(Duration::from_secs(1));
        let stats_before = a.stdout();
        assert!(stats_before.is_empty());
        let t = Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(a.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let (status, _) = exit_within(&mut a, 10);
        let took = t.elapsed();
        stop.store(true, Ordering::Relaxed);
        for f in floods {
            let _ = f.join();
        }
        eprintln!("{engine}: exit {status} {took:?} after SIGTERM under load");
        assert!(status.success(), "{engine}: {}", a.stderr());
        let out = a.stdout();
        assert!(out.contains("summary total"), "{engine}: {out}");
        assert!(
            stat(&out, "summary total", "packets") > 1000,
            "{engine}: {out}"
        );
        assert!(!topo.a.has_link("tun0"), "{engine}: device left behind");
        // The transfer thread now fails (its tunnel is gone): not joined.
    }
}

/// How a starved forwarder started: up, or refused with this exit status
/// and stderr.
type Started = Result<Proc, (std::process::ExitStatus, String)>;

/// Spawns `cmd` and waits (hang guard 20 s) until the tunnel is up or the
/// process exits.
fn up_or_refused(cmd: std::process::Command) -> Started {
    let mut p = Proc::spawn(cmd);
    let t = Instant::now();
    while !p.stderr().contains("tunnel up") {
        if let Ok(Some(s)) = p.child.try_wait() {
            std::thread::sleep(Duration::from_millis(50));
            return Err((s, p.stderr()));
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "hang at start: {}",
            p.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(p)
}

/// Starved resources: each works more slowly or fails at start with a
/// clear message; never a panic or a hang. Side a is starved, side b runs
/// normally.
#[test]
fn starved_resources_work_or_fail_clearly() {
    if !can_run_kernel_tests("starved_resources_work_or_fail_clearly") {
        return;
    }
    let topo = Topology::new();
    let dst: SocketAddr = format!("{OVERLAY_B}:7000").parse().unwrap();
    // (engine, prlimit option or "", extra flags, the error it must give
    // if it must fail).
    let cases: &[(&str, &str, &[&str], Option<&str>)] = &[
        ("poll", "", &["--sndbuf", "1024", "--rcvbuf", "1024"], None),
        ("uring", "", &["--sndbuf", "1024", "--rcvbuf", "1024"], None),
        ("uring", "", &["--buffers", "1"], Some("--buffers 1")),
        ("uring", "", &["--buffers", "2"], None),
        ("uring", "--memlock=65536", &[], None),
        ("auto", "--memlock=65536", &[], None),
        (
            "poll",
            "--nofile=8",
            &["--queues", "8"],
            Some("Too many open files"),
        ),
        (
            "uring",
            "--nofile=8",
            &["--queues", "8"],
            Some("Too many open files"),
        ),
    ];
    let uring = uring_usable("starved_resources_work_or_fail_clearly");
    for &(engine, limit, extra, must_fail) in cases.iter().filter(|c| c.0 != "uring" || uring) {
        let mut args = vec!["--engine", engine];
        args.extend(extra);
        // Without CAP_IPC_LOCK, so RLIMIT_MEMLOCK applies to root too.
        let mut cmd = topo.a.command(&[
            "setpriv",
            "--bounding-set=-ipc_lock",
            "--inh-caps=-ipc_lock",
        ]);
        if !limit.is_empty() {
            cmd.args(["prlimit", limit, "--"]);
        }
        cmd.arg(tunfwd_bin()).args(tunnel_args(true, &args));
        let what = format!("{engine} {limit} {extra:?}");
        match up_or_refused(cmd) {
            Ok(mut a) => {
                assert!(must_fail.is_none(), "{what}: started: {}", a.stderr());
                let mut b = Proc::tunfwd(&topo.b, &tunnel_args(false, &[]));
                verified_tcp_transfer(&topo.a, &topo.b, dst, 2 << 20);
                assert!(a.terminate().success(), "{what}");
                assert!(b.terminate().success());
                if !uring {
                    // Without io_uring, auto is poll, and says so.
                    assert!(
                        engine != "auto" || a.stderr().contains("using the poll engine"),
                        "{what}: {}",
                        a.stderr()
                    );
                } else if limit.contains("memlock") {
                    // The README's promise: it falls back, and says so.
                    assert!(
                        a.stderr().contains("unregistered buffers"),
                        "{what}: no fallback line: {}",
                        a.stderr()
                    );
                    // Two rings (about 132 KiB, with the probe's) do not
                    // fit 64 KiB: --queues auto runs one, and says so.
                    if usable_cpus() > 1 {
                        assert!(
                            a.stderr().contains("queues auto: io_uring rings for")
                                && a.stderr().contains("1 queue(s), engine uring"),
                            "{what}: no fitted count: {}",
                            a.stderr()
                        );
                    }
                }
                let log: Vec<_> = a
                    .stderr()
                    .lines()
                    .filter(|l| !l.contains("offload"))
                    .map(String::from)
                    .collect();
                eprintln!("{what}: works: {}", log.join(" / "));
            }
            Err((status, err)) => {
                assert!(
                    must_fail.is_some(),
                    "{what}: must work (README, Reliability) but was refused: {err}"
                );
                assert!(!status.success(), "{what}");
                assert!(!err.contains("panicked"), "{what}: {err}");
                let last = err.lines().last().unwrap_or("");
                assert!(last.starts_with("tunfwd: error: "), "{what}: {err}");
                if let Some(want) = must_fail {
                    assert!(last.contains(want), "{what}: {err}");
                }
                assert!(!topo.a.has_link("tun0"), "{what}: device left behind");
                eprintln!("{what}: refused: {last}");
            }
        }
    }
}
