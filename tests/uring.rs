//! The io_uring engine's features and fallbacks, against the real kernel:
//! each forced fallback still carries verified traffic, no io-wq threads
//! appear under load, and the tuning flags take effect. Need root.

#![cfg(target_os = "linux")]

mod common;

use std::net::SocketAddr;
use std::process::Command;

use common::*;

/// Both forwarders with `extra` flags; a ping and a verified 4 MiB transfer
/// through them. Returns the two processes (still running).
fn pair_with_traffic(topo: &Topology, extra: &[&str]) -> (Proc, Proc) {
    let a = Proc::tunfwd(&topo.a, &tunnel_args(true, extra));
    let b = Proc::tunfwd(&topo.b, &tunnel_args(false, extra));
    assert!(topo.a.ping(OVERLAY_B), "ping with {extra:?}");
    let dst: SocketAddr = format!("{OVERLAY_B}:7000").parse().unwrap();
    verified_tcp_transfer(&topo.a, &topo.b, dst, 4 << 20);
    (a, b)
}

/// The default engine (auto) is io_uring where the kernel offers it, and
/// poll, with one line saying why, where it does not (run with io_uring
/// disabled: `kernel.io_uring_disabled=2` and `TUNFWD_SKIP_URING=1`).
#[test]
fn auto_engine_is_uring_here_or_falls_back_to_poll() {
    let test = "auto_engine_is_uring_here_or_falls_back_to_poll";
    if !can_run_kernel_tests(test) {
        return;
    }
    let topo = Topology::new();
    let mut a = Proc::tunfwd(&topo.a, &tunnel_args(true, &[]));
    let mut b = Proc::tunfwd(&topo.b, &tunnel_args(false, &[]));
    let err = a.stderr();
    if let Err(why) = uring_available() {
        assert!(
            uring_skip_asked(),
            "{test}: io_uring is not usable here ({why}); set TUNFWD_SKIP_URING=1 to check the fallback instead"
        );
        assert!(err.contains("engine poll"), "{err}");
        assert!(
            err.contains("io_uring unavailable") && err.contains("using the poll engine"),
            "{err}"
        );
    } else {
        assert!(err.contains("engine uring"), "{err}");
    }
    // Whichever it chose forwards.
    let dst: SocketAddr = format!("{OVERLAY_B}:7000").parse().unwrap();
    verified_tcp_transfer(&topo.a, &topo.b, dst, 4 << 20);
    assert!(a.terminate().success());
    assert!(b.terminate().success());
}

#[test]
fn forced_fallbacks_still_forward() {
    if !can_run_kernel_tests("forced_fallbacks_still_forward") {
        return;
    }
    if !uring_usable("forced_fallbacks_still_forward") {
        return;
    }
    for flags in [
        vec!["--engine", "uring", "--multishot", "off"],
        vec!["--engine", "uring", "--fixed-buffers", "off"],
        vec![
            "--engine",
            "uring",
            "--multishot",
            "off",
            "--fixed-buffers",
            "off",
            "--inflight",
            "1",
        ],
        vec!["--engine", "uring", "--multishot", "off", "--inflight", "8"],
        vec!["--engine", "uring", "--buffers", "4", "--inflight", "1"],
    ] {
        let topo = Topology::new();
        let (mut a, mut b) = pair_with_traffic(&topo, &flags);
        assert!(a.terminate().success(), "{flags:?}");
        assert!(b.terminate().success(), "{flags:?}");
        let out = a.stdout();
        assert!(
            stat(&out, "summary total", "packets") > 1000,
            "{flags:?}: {out}"
        );
    }
}

/// A small RLIMIT_MEMLOCK (and no CAP_IPC_LOCK, which would exempt root):
/// at 128 KiB registered buffers do not fit and `auto` uses unregistered
/// ones; `--fixed-buffers on` fails clearly; at 16 KiB not even the rings
/// fit and `--engine auto` falls back to poll.
#[test]
fn low_memlock_falls_back() {
    if !can_run_kernel_tests("low_memlock_falls_back") {
        return;
    }
    if !uring_usable("low_memlock_falls_back") {
        return;
    }
    let topo = Topology::new();
    let spawn = |ns: &Netns, side_a: bool, memlock: &str, extra: &[&str]| {
        let limit = format!("--memlock={memlock}");
        let mut cmd = ns.command(&[
            "setpriv",
            "--bounding-set=-ipc_lock",
            "--inh-caps=-ipc_lock",
            "prlimit",
            &limit,
            "--",
            tunfwd_bin(),
        ]);
        cmd.args(tunnel_args(side_a, extra));
        cmd
    };
    for (memlock, want_log, want_engine) in [
        ("131072", "using unregistered buffers", "engine uring"),
        ("16384", "using the poll engine", "engine poll"),
    ] {
        let mut a = Proc::spawn(spawn(&topo.a, true, memlock, &[]));
        a.wait_for_stderr("tunnel up");
        let mut b = Proc::spawn(spawn(&topo.b, false, memlock, &[]));
        b.wait_for_stderr("tunnel up");
        let log = a.stderr();
        assert!(
            log.contains(want_log) && log.contains(want_engine),
            "{memlock}: {log}"
        );
        // --queues auto fits the count to the limit, and says so.
        if usable_cpus() > 1 {
            assert!(
                log.contains("queues auto: io_uring rings for") && log.contains(" 1 queue(s),"),
                "{memlock}: {log}"
            );
        }
        assert!(topo.a.ping(OVERLAY_B));
        let dst: SocketAddr = format!("{OVERLAY_B}:7000").parse().unwrap();
        verified_tcp_transfer(&topo.a, &topo.b, dst, 4 << 20);
        assert!(a.terminate().success());
        assert!(b.terminate().success());
    }

    let out = spawn(
        &topo.a,
        true,
        "131072",
        &["--engine", "uring", "--fixed-buffers", "on"],
    )
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("--fixed-buffers on:"), "{err}");
    assert!(err.contains("RLIMIT_MEMLOCK"), "{err}");
}

/// No io-wq worker threads (`iou-wrk-*`) while traffic flows: every
/// operation completes inline or through internal poll.
#[test]
fn no_io_wq_threads_under_load() {
    if !can_run_kernel_tests("no_io_wq_threads_under_load") {
        return;
    }
    if !uring_usable("no_io_wq_threads_under_load") {
        return;
    }
    let topo = Topology::new();
    let a = Proc::tunfwd(&topo.a, &tunnel_args(true, &["--engine", "uring"]));
    let b = Proc::tunfwd(&topo.b, &tunnel_args(false, &["--engine", "uring"]));
    let pids = [a.child.id(), b.child.id()];
    let watcher = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for _ in 0..200 {
            for pid in pids {
                if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
                    for t in tasks.flatten() {
                        let comm =
                            std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
                        if comm.starts_with("iou-wrk") {
                            seen.push(comm.trim().to_string());
                        }
                    }
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        seen
    });
    let dst: SocketAddr = format!("{OVERLAY_B}:7000").parse().unwrap();
    verified_tcp_transfer(&topo.a, &topo.b, dst, 64 << 20);
    let seen = watcher.join().unwrap();
    assert!(seen.is_empty(), "io-wq threads appeared: {seen:?}");
}

/// `--cpus` pins each worker thread.
#[test]
fn cpus_pin_workers() {
    if !can_run_kernel_tests("cpus_pin_workers") {
        return;
    }
    let topo = Topology::new();
    for engine in engines("cpus_pin_workers") {
        let a = Proc::tunfwd(
            &topo.a,
            &tunnel_args(
                true,
                &["--engine", engine, "--queues", "2", "--cpus", "1,0"],
            ),
        );
        let pid = a.child.id();
        let mut pinned = Vec::new();
        for (comm, task) in worker_tasks(pid) {
            let status = std::fs::read_to_string(task.join("status")).unwrap();
            let cpus = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .unwrap()
                .trim()
                .to_string();
            pinned.push((comm, cpus));
        }
        pinned.sort();
        assert_eq!(
            pinned,
            vec![
                ("tunfwd-q0".to_string(), "1".to_string()),
                ("tunfwd-q1".to_string(), "0".to_string())
            ],
            "{engine}"
        );
    }
}

/// `--sndbuf`/`--rcvbuf` reach the socket (the kernel reports double the
/// requested size, its bookkeeping overhead).
#[test]
fn socket_buffer_flags_apply() {
    if !can_run_kernel_tests("socket_buffer_flags_apply") {
        return;
    }
    let topo = Topology::new();
    let _a = Proc::tunfwd(
        &topo.a,
        &tunnel_args(true, &["--sndbuf", "3000000", "--rcvbuf", "5000000"]),
    );
    let out = topo
        .a
        .command(&["ss", "-u", "-a", "-n", "-m"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("rb10000000") && text.contains("tb6000000"),
        "{text}"
    );
}

/// Busy polling and SQPOLL still forward correctly.
#[test]
fn busy_poll_and_sqpoll_forward() {
    if !can_run_kernel_tests("busy_poll_and_sqpoll_forward") {
        return;
    }
    if !uring_usable("busy_poll_and_sqpoll_forward") {
        return;
    }
    for flags in [
        vec!["--engine", "poll", "--busy-poll"],
        vec!["--engine", "uring", "--busy-poll"],
        vec!["--engine", "uring", "--sqpoll=50"],
    ] {
        let topo = Topology::new();
        let (mut a, mut b) = pair_with_traffic(&topo, &flags);
        assert!(a.terminate().success(), "{flags:?}");
        assert!(b.terminate().success(), "{flags:?}");
    }
}

#[test]
fn uring_flag_errors() {
    for (args, want) in [
        (
            vec!["--engine", "poll", "--buffers", "64"],
            "--buffers applies to the io_uring engine only",
        ),
        (vec!["--buffers", "100"], "must be a power of two"),
        (
            vec!["--ring-entries", "4"],
            "--ring-entries 4 is out of range",
        ),
        (vec!["--inflight", "0"], "--inflight 0 is out of range"),
        (vec!["--sqpoll-cpu", "1"], "--sqpoll-cpu needs --sqpoll"),
        (vec!["--cpus", "3-1"], "--cpus"),
        (vec!["--sndbuf", "1"], "--sndbuf 1 is out of range"),
    ] {
        let mut full = vec!["tunnel", "--listen", "127.0.0.1:0", "--peer", "127.0.0.1:9"];
        full.extend(&args);
        let out = Command::new(tunfwd_bin()).args(&full).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
