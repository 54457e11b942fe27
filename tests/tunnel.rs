//! Real-kernel tests of `tunfwd tunnel`: two namespaces joined by veth, a
//! TUN device in each, traffic through the tunnel. Need root; under CI=true
//! they fail instead of skipping.

#![cfg(target_os = "linux")]

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;

fn engine_args(engine: &str) -> Vec<&str> {
    vec!["--engine", engine]
}

/// Two forwarders, one per namespace.
fn start_pair(topo: &Topology, extra: &[&str]) -> (Proc, Proc) {
    let a = Proc::tunfwd(&topo.a, &tunnel_args(true, extra));
    let b = Proc::tunfwd(&topo.b, &tunnel_args(false, extra));
    (a, b)
}

#[test]
fn ping_ipv4_and_ipv6_both_ways() {
    if !can_run_kernel_tests("ping_ipv4_and_ipv6_both_ways") {
        return;
    }
    for engine in engines("ping_ipv4_and_ipv6_both_ways") {
        let topo = Topology::new();
        let (mut a, mut b) = start_pair(&topo, &engine_args(engine));
        assert!(topo.a.ping(OVERLAY_B), "{engine}: ping a->b v4");
        assert!(topo.b.ping(OVERLAY_A), "{engine}: ping b->a v4");
        assert!(topo.a.ping(OVERLAY6_B), "{engine}: ping a->b v6");
        assert!(topo.b.ping(OVERLAY6_A), "{engine}: ping b->a v6");
        assert!(a.terminate().success());
        assert!(b.terminate().success());
        // 12 echo requests and 12 replies cross each forwarder.
        let out = a.stdout();
        assert!(stat(&out, "summary total", "packets") >= 12, "{out}");
    }
}

#[test]
fn tcp_transfer_64mib_verified() {
    if !can_run_kernel_tests("tcp_transfer_64mib_verified") {
        return;
    }
    for engine in engines("tcp_transfer_64mib_verified") {
        let topo = Topology::new();
        let (mut a, mut b) = start_pair(&topo, &engine_args(engine));
        let dst: SocketAddr = format!("{OVERLAY_B}:7000").parse().unwrap();
        verified_tcp_transfer(&topo.a, &topo.b, dst, 64 << 20);
        // And back over IPv6, smaller.
        let dst6: SocketAddr = format!("[{OVERLAY6_A}]:7001").parse().unwrap();
        verified_tcp_transfer(&topo.b, &topo.a, dst6, 8 << 20);
        assert!(a.terminate().success());
        assert!(b.terminate().success());
        let out = a.stdout();
        assert!(stat(&out, "summary total", "bytes") > 64 << 20, "{out}");
    }
}

#[test]
fn iperf3_tcp_through_tunnel() {
    if !can_run_kernel_tests("iperf3_tcp_through_tunnel") {
        return;
    }
    for engine in engines("iperf3_tcp_through_tunnel") {
        let topo = Topology::new();
        let (_a, _b) = start_pair(&topo, &engine_args(engine));
        let bps = iperf3_tcp(&topo.a, &topo.b, OVERLAY_B, 2, 5201);
        assert!(bps > 0.0, "{engine}: iperf3 reported {bps} bit/s");
        eprintln!(
            "{engine}: iperf3 TCP through tunnel: {:.0} Mbit/s",
            bps / 1e6
        );
    }
}

/// tunfwd on side a, socat (a UDP tunnel nobody here wrote) on side b.
#[test]
fn interop_with_socat() {
    if !can_run_kernel_tests("interop_with_socat") {
        return;
    }
    for engine in engines("interop_with_socat") {
        let topo = Topology::new();
        let mut a = Proc::tunfwd(&topo.a, &tunnel_args(true, &engine_args(engine)));
        let socat = Proc::spawn(topo.b.command(&[
            "socat",
            &format!("TUN:{OVERLAY_B}/24,tun-type=tun,iff-no-pi,iff-up,tun-name=tun0"),
            &format!("UDP:{UNDERLAY_A}:{PORT},bind={UNDERLAY_B}:{PORT}"),
        ]));
        // socat creates tun0 at start; give it tunfwd's MTU.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !topo.b.has_link("tun0") {
            assert!(
                std::time::Instant::now() < deadline,
                "socat did not create tun0: {}",
                socat.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        topo.b.ip(&["link", "set", "tun0", "mtu", "1452"]);

        assert!(topo.a.ping(OVERLAY_B), "{engine}: ping tunfwd->socat");
        assert!(topo.b.ping(OVERLAY_A), "{engine}: ping socat->tunfwd");
        let to_b: SocketAddr = format!("{OVERLAY_B}:7000").parse().unwrap();
        let to_a: SocketAddr = format!("{OVERLAY_A}:7001").parse().unwrap();
        verified_tcp_transfer(&topo.a, &topo.b, to_b, 16 << 20);
        verified_tcp_transfer(&topo.b, &topo.a, to_a, 16 << 20);
        assert!(a.terminate().success());
        drop(socat);
    }
}

/// A well-formed packet sent from anyone but the peer never reaches the TUN
/// device, and is counted.
#[test]
fn spoofed_datagrams_are_dropped_and_counted() {
    if !can_run_kernel_tests("spoofed_datagrams_are_dropped_and_counted") {
        return;
    }
    for engine in engines("spoofed_datagrams_are_dropped_and_counted") {
        let topo = Topology::new();
        // A second underlay address on b, outside the peer's.
        topo.b.ip(&["addr", "add", "198.18.1.2/32", "dev", "veth0"]);
        topo.a
            .ip(&["route", "add", "198.18.1.0/24", "dev", "veth0"]);
        let (mut a, mut b) = start_pair(&topo, &engine_args(engine));

        // The victim: a UDP socket on a's overlay address.
        let (bound, ready) = std::sync::mpsc::channel();
        let listener = topo.a.spawn(move || {
            let s = UdpSocket::bind(format!("{OVERLAY_A}:7000")).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            bound.send(()).unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 2048];
            while let Ok((n, _)) = s.recv_from(&mut buf) {
                got.push(buf[..n].to_vec());
                if &buf[..n] == b"genuine" {
                    break;
                }
            }
            got
        });
        ready
            .recv_timeout(Duration::from_secs(10))
            .expect("listener bound");

        topo.b
            .spawn(|| {
                let inner =
                    ipv4_udp_packet([198, 19, 0, 2], [198, 19, 0, 1], 7001, 7000, b"spoofed");
                let peer: SocketAddr = format!("{UNDERLAY_A}:{PORT}").parse().unwrap();
                // Right address, wrong port.
                let s = UdpSocket::bind(format!("{UNDERLAY_B}:6000")).unwrap();
                s.send_to(&inner, peer).unwrap();
                // Wrong address, right port.
                let s = UdpSocket::bind(format!("198.18.1.2:{PORT}")).unwrap();
                s.send_to(&inner, peer).unwrap();
                // A genuine packet through the tunnel, so the listener is
                // known to work (it arrives after the spoofed ones, which
                // took the same path first).
                let s = UdpSocket::bind(format!("{OVERLAY_B}:7001")).unwrap();
                s.send_to(b"genuine", format!("{OVERLAY_A}:7000")).unwrap();
            })
            .join()
            .unwrap();

        let got = listener.join().unwrap();
        assert_eq!(
            got,
            vec![b"genuine".to_vec()],
            "{engine}: listener saw {got:?}"
        );
        assert!(a.terminate().success());
        assert!(b.terminate().success());
        let out = a.stdout();
        assert_eq!(stat(&out, "summary total", "not_from_peer"), 2, "{out}");
    }
}

/// SIGTERM while a transfer runs: exit 0, a summary, the device gone.
#[test]
fn sigterm_mid_transfer_exits_cleanly() {
    if !can_run_kernel_tests("sigterm_mid_transfer_exits_cleanly") {
        return;
    }
    for engine in engines("sigterm_mid_transfer_exits_cleanly") {
        let topo = Topology::new();
        let (mut a, _b) = start_pair(&topo, &engine_args(engine));
        let (tx, rx) = std::sync::mpsc::channel();
        let received = Arc::new(AtomicU64::new(0));
        let seen = received.clone();
        let sink = topo.b.spawn(move || {
            let l = std::net::TcpListener::bind(format!("{OVERLAY_B}:7000")).unwrap();
            tx.send(()).unwrap();
            let (mut s, _) = l.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let mut total = 0u64;
            let mut buf = vec![0u8; 65536];
            while let Ok(n) = std::io::Read::read(&mut s, &mut buf) {
                if n == 0 {
                    break;
                }
                total += n as u64;
                seen.store(total, Ordering::Relaxed);
            }
            total
        });
        rx.recv().unwrap();
        let source = topo.a.spawn(|| {
            let mut s = std::net::TcpStream::connect(format!("{OVERLAY_B}:7000")).unwrap();
            s.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
            let buf = vec![7u8; 65536];
            let mut sent = 0u64;
            while std::io::Write::write_all(&mut s, &buf).is_ok() {
                sent += buf.len() as u64;
            }
            sent
        });
        // The signal must meet a running transfer: wait for 4 MiB to arrive.
        let deadline = Instant::now() + Duration::from_secs(20);
        while received.load(Ordering::Relaxed) < 4 << 20 {
            assert!(
                Instant::now() < deadline,
                "{engine}: the transfer did not start"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let status = a.terminate();
        assert!(
            status.success(),
            "{engine}: exit status {status}\n{}",
            a.stderr()
        );
        let out = a.stdout();
        assert!(out.contains("tunfwd: summary total"), "{out}");
        assert!(stat(&out, "summary total", "packets") > 0, "{out}");
        assert!(a.stderr().contains("SIGTERM received"), "{}", a.stderr());
        assert!(
            !topo.a.has_link("tun0"),
            "{engine}: tun0 still exists after exit"
        );
        let sent = source.join().unwrap();
        let received = sink.join().unwrap();
        assert!(
            sent > 0 && received > 0,
            "transfer was running: sent {sent}, received {received}"
        );
    }
}

/// Attach to persistent devices made by `ip tuntap`: multi-queue and
/// single-queue. Traffic flows, and the devices stay after exit.
#[test]
fn attach_to_persistent_device() {
    if !can_run_kernel_tests("attach_to_persistent_device") {
        return;
    }
    for engine in engines("attach_to_persistent_device") {
        let topo = Topology::new();
        topo.a.ip(&[
            "tuntap",
            "add",
            "dev",
            "ptun0",
            "mode",
            "tun",
            "multi_queue",
        ]);
        topo.b.ip(&["tuntap", "add", "dev", "ptun0", "mode", "tun"]);
        let args = |side_a: bool| {
            let mut v = tunnel_args(side_a, &["--attach", "--engine", engine]);
            v[2] = "ptun0".into();
            v
        };
        // What the runtime reads before fitting --queues auto: the
        // kernel's word on each device, in its namespace (and a veth
        // there, which is no TUN device at all).
        topo.b
            .ip(&["link", "add", "pveth0", "type", "veth", "peer", "pveth1"]);
        let kernel_says = |ns: &Netns, dev: &'static str| {
            ns.spawn(move || tunfwd::netlink::tun_multi_queue(dev).unwrap())
                .join()
                .unwrap()
        };
        assert_eq!(kernel_says(&topo.a, "ptun0"), Some(true));
        assert_eq!(kernel_says(&topo.b, "ptun0"), Some(false));
        assert_eq!(kernel_says(&topo.b, "pveth0"), None);
        let mut a = Proc::tunfwd(&topo.a, &args(true));
        let mut b = Proc::tunfwd(&topo.b, &args(false));
        // --queues auto: a's multi-queue device takes one queue per CPU,
        // b's single-queue one takes one, and b says so.
        let queues = usable_cpus().min(8);
        let up = |p: &Proc, queues: usize| {
            let said = p.stderr();
            said.contains("dev ptun0 (attached)") && said.contains(&format!(", {queues} queue(s),"))
        };
        assert!(up(&a, queues), "{}", a.stderr());
        if queues > 1 {
            assert!(
                b.stderr()
                    .contains("queues auto: ptun0 exists without multi_queue: 1 queue"),
                "{}",
                b.stderr()
            );
        }
        assert!(up(&b, 1), "{}", b.stderr());
        assert!(
            topo.a.ping(OVERLAY_B),
            "{engine}: ping over attached devices"
        );
        assert!(
            topo.b.ping(OVERLAY6_A),
            "{engine}: ping6 over attached devices"
        );
        assert!(a.terminate().success());
        assert!(b.terminate().success());
        assert!(topo.a.has_link("ptun0"), "persistent device was removed");
        assert!(topo.b.has_link("ptun0"), "persistent device was removed");
    }
}

/// `--queues 2`: two queues, two workers, two UDP ports per host. Parallel
/// flows spread over both workers on both hosts (16 flows: the chance that
/// the kernel's flow hash puts all of them on one queue is 2^-15).
#[test]
fn two_queues_spread_flows_over_both_workers() {
    if !can_run_kernel_tests("two_queues_spread_flows_over_both_workers") {
        return;
    }
    for engine in engines("two_queues_spread_flows_over_both_workers") {
        let topo = Topology::new();
        let (mut a, mut b) = start_pair(&topo, &["--queues", "2", "--engine", engine]);
        std::thread::scope(|s| {
            for i in 0..16u16 {
                let topo = &topo;
                s.spawn(move || {
                    let dst: SocketAddr = format!("{OVERLAY_B}:{}", 7100 + i).parse().unwrap();
                    verified_tcp_transfer(&topo.a, &topo.b, dst, 1 << 20);
                });
            }
        });
        assert!(topo.a.ping(OVERLAY6_B));
        assert!(a.terminate().success());
        assert!(b.terminate().success());
        for (host, out) in [("a", a.stdout()), ("b", b.stdout())] {
            for q in ["queue=0", "queue=1"] {
                let tag = format!("summary {q}");
                let moved = stat_sum(&out, &tag, "packets");
                assert!(
                    moved > 0,
                    "{engine}: host {host} worker {q} carried nothing:\n{out}"
                );
            }
        }
    }
}

/// `--share-port` in a plaintext tunnel (with `--queues auto`, the
/// default): two CPUs, two workers on one UDP port. Every datagram between the hosts has the same
/// addresses and ports, so the kernel's own choice in the port's socket
/// group would give all of them to one worker: that the receiving workers
/// both carry packets shows the inner-flow steering at work, and that each
/// worker received what the same queue sent shows a flow keeps one queue
/// on both hosts. The ends need not agree: against `--queues 1` every flow
/// still arrives, verified.
#[test]
fn share_port_queues_steer_flows_by_inner_flow() {
    let test = "share_port_queues_steer_flows_by_inner_flow";
    if !can_run_kernel_tests(test) {
        return;
    }
    let flows = |topo: &Topology| {
        std::thread::scope(|s| {
            for i in 0..16u16 {
                s.spawn(move || {
                    let dst: SocketAddr = format!("{OVERLAY_B}:{}", 7200 + i).parse().unwrap();
                    verified_tcp_transfer(&topo.a, &topo.b, dst, 1 << 20);
                });
            }
        });
    };
    for engine in engines(test) {
        let topo = Topology::new();
        let auto = ["--engine", engine, "--share-port", "--cpus", "0,1"];
        let (mut a, mut b) = start_pair(&topo, &auto);
        for p in [&a, &b] {
            assert!(
                p.stderr().contains("2 queue(s)"),
                "{engine}: two CPUs, two queues:\n{}",
                p.stderr()
            );
        }
        flows(&topo);
        assert!(topo.a.ping(OVERLAY6_B));
        assert!(a.terminate().success());
        assert!(b.terminate().success());
        let (out_a, out_b) = (a.stdout(), b.stdout());
        for q in ["queue=0", "queue=1"] {
            let tag = format!("summary {q}");
            let sent = direction_stat(&out_a, &tag, "tun_to_peer", "packets");
            let received = direction_stat(&out_b, &tag, "peer_to_tun", "packets");
            assert!(
                received > 0,
                "{engine}: b's worker {q} received nothing:\n{out_b}"
            );
            // A flow's packets leave a's queue k and arrive at b's queue k
            // (b's TUN device then reads the flow's replies on k): what a's
            // workers sent, b's same workers received, up to the packets
            // the kernel sent on before the flows settled.
            let (lo, hi) = (sent.min(received), sent.max(received));
            assert!(
                hi - lo <= hi / 20,
                "{engine}: {q}: a sent {sent}, b received {received}:\n{out_a}\n{out_b}"
            );
        }
        // Against an end with one queue: every flow arrives, both ways.
        let (mut a, mut b) = (
            Proc::tunfwd(&topo.a, &tunnel_args(true, &auto)),
            Proc::tunfwd(
                &topo.b,
                &tunnel_args(false, &["--engine", engine, "--queues", "1"]),
            ),
        );
        flows(&topo);
        assert!(topo.b.ping(OVERLAY_A));
        assert!(a.terminate().success());
        assert!(b.terminate().success());
        let out_a = a.stdout();
        assert!(
            direction_stat(&out_a, "summary queue=1", "tun_to_peer", "packets") > 0,
            "{engine}: a's second worker sent nothing to the one-queue end:\n{out_a}"
        );
        assert_eq!(
            stat(&b.stdout(), "summary total", "drops"),
            0,
            "{engine}: the one-queue end dropped datagrams:\n{}",
            b.stdout()
        );
    }
}

/// `--stats-interval` prints periodic lines; `--txqueuelen` and `--mtu`
/// reach the device (default txqueuelen on a created device: 256 with the
/// default --aqm fq-codel).
#[test]
fn stats_interval_and_device_settings() {
    if !can_run_kernel_tests("stats_interval_and_device_settings") {
        return;
    }
    let topo = Topology::new();
    let mut a = Proc::tunfwd(
        &topo.a,
        &tunnel_args(
            true,
            &[
                "--stats-interval",
                "1",
                "--txqueuelen",
                "2345",
                "--mtu",
                "1400",
            ],
        ),
    );
    let _b = Proc::tunfwd(&topo.b, &tunnel_args(false, &[]));
    let link = String::from_utf8_lossy(&topo.a.ip(&["link", "show", "tun0"]).stdout).to_string();
    assert!(
        link.contains("mtu 1400") && link.contains("qlen 2345"),
        "{link}"
    );
    let link_b = String::from_utf8_lossy(&topo.b.ip(&["link", "show", "tun0"]).stdout).to_string();
    assert!(link_b.contains("qlen 256"), "default txqueuelen: {link_b}");
    assert!(topo.a.ping(OVERLAY_B));
    a.wait_for_stdout("tunfwd: stats t=");
    let out = a.stdout();
    let line = out
        .lines()
        .find(|l| l.contains("tunfwd: stats t="))
        .unwrap();
    assert!(
        line.contains("rate_pps=") && line.contains("tun_to_peer packets="),
        "{line}"
    );
}

/// An IPv6 link-local underlay: `--listen` and `--peer` name their scope by
/// interface (`[fe80::a%veth0]:5000`), both queues keep it, and traffic
/// flows both ways with nothing counted as a stranger.
#[test]
fn ipv6_link_local_underlay_with_named_scope() {
    if !can_run_kernel_tests("ipv6_link_local_underlay_with_named_scope") {
        return;
    }
    for engine in engines("ipv6_link_local_underlay_with_named_scope") {
        let topo = Topology::new();
        // nodad: usable at once, no duplicate address detection to wait for.
        topo.a
            .ip(&["addr", "add", "fe80::a/64", "dev", "veth0", "nodad"]);
        topo.b
            .ip(&["addr", "add", "fe80::b/64", "dev", "veth0", "nodad"]);
        let args = |me: &str, peer: &str, overlay: &str| -> Vec<String> {
            [
                "tunnel",
                "--engine",
                engine,
                "--queues",
                "2",
                "--dev",
                "tun0",
                "--address",
                overlay,
                "--listen",
                me,
                "--peer",
                peer,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect()
        };
        let mut a = Proc::tunfwd(
            &topo.a,
            &args(
                "[fe80::a%veth0]:5000",
                "[fe80::b%veth0]:5000",
                "198.19.0.1/24",
            ),
        );
        let mut b = Proc::tunfwd(
            &topo.b,
            &args(
                "[fe80::b%veth0]:5000",
                "[fe80::a%veth0]:5000",
                "198.19.0.2/24",
            ),
        );
        assert!(
            topo.a.ping(OVERLAY_B),
            "{engine}: ping over a link-local underlay"
        );
        let dst: SocketAddr = format!("{OVERLAY_B}:7000").parse().unwrap();
        verified_tcp_transfer(&topo.a, &topo.b, dst, 4 << 20);
        assert!(a.terminate().success(), "{engine}");
        assert!(b.terminate().success(), "{engine}");
        for out in [a.stdout(), b.stdout()] {
            assert_eq!(stat(&out, "summary total", "not_from_peer"), 0, "{out}");
            assert!(stat(&out, "summary total", "packets") > 0, "{out}");
        }
    }
}

/// The nice value of process `pid`'s first worker thread (`tunfwd-q0`),
/// from /proc/PID/task/TID/stat (None if it has none).
fn worker_nice(pid: u32) -> Option<i32> {
    let (_, task) = worker_tasks(pid)
        .into_iter()
        .find(|(comm, _)| comm == "tunfwd-q0")?;
    let stat = std::fs::read_to_string(task.join("stat")).ok()?;
    // Fields after "(comm) ": state is the 3rd of the line, nice the 19th.
    let rest = stat.rsplit_once(") ")?.1;
    rest.split_whitespace().nth(16)?.parse().ok()
}

/// `--wake-nice`: each side's worker sleeps at the raised priority, drops
/// back to its own after its budget while a transfer keeps it busy
/// (counted), and sleeps raised again once the tunnel is idle. Without the
/// privilege (CAP_SYS_NICE and CAP_SYS_RESOURCE taken from the bounding
/// set), one line says so and the tunnel carries traffic at the normal
/// priority.
#[test]
fn wake_nice_raises_sleeping_workers_and_drops_back_under_load() {
    let test = "wake_nice_raises_sleeping_workers_and_drops_back_under_load";
    if !can_run_kernel_tests(test) {
        return;
    }
    for engine in engines(test) {
        let topo = Topology::new();
        let extra = [
            "--engine",
            engine,
            "--wake-nice",
            "-10",
            "--wake-budget",
            "16",
        ];
        let (mut a, mut b) = start_pair(&topo, &extra);
        for p in [&mut a, &mut b] {
            let pid = p.child.id();
            p.wait_until("the worker asleep at nice -10", |_| {
                (worker_nice(pid) == Some(-10)).then_some(())
            });
        }
        let dst: SocketAddr = format!("{OVERLAY_B}:7300").parse().unwrap();
        verified_tcp_transfer(&topo.a, &topo.b, dst, 16 << 20);
        let pid = a.child.id();
        a.wait_until("the worker asleep at nice -10 again", |_| {
            (worker_nice(pid) == Some(-10)).then_some(())
        });
        assert!(topo.a.ping(OVERLAY6_B), "{engine}: ping");
        assert!(a.terminate().success());
        assert!(b.terminate().success());
        for (host, p) in [("a", &a), ("b", &b)] {
            let out = p.stdout();
            let lowered = stat(&out, "summary total", "wake_lowered");
            assert!(
                lowered > 0,
                "{engine}: {host}'s worker never dropped back during 16 MiB:\n{out}"
            );
            assert!(!p.stderr().contains("cannot raise"), "{}", p.stderr());
        }

        // No privilege to raise a priority: one line, normal priority,
        // traffic flows.
        let args = tunnel_args(true, &extra);
        let mut cmd = topo.a.command(&[
            "setpriv",
            "--bounding-set",
            "-sys_nice,-sys_resource",
            "--",
            tunfwd_bin(),
        ]);
        cmd.args(&args);
        let mut a = Proc::spawn(cmd);
        a.wait_for_stderr("tunnel up");
        a.wait_for_stderr("--wake-nice -10: cannot raise the worker's priority");
        let mut b = Proc::tunfwd(&topo.b, &tunnel_args(false, &["--engine", engine]));
        assert!(
            topo.a.ping(OVERLAY_B),
            "{engine}: ping without the privilege"
        );
        assert_eq!(worker_nice(a.child.id()), Some(0), "{engine}");
        assert!(a.terminate().success());
        assert!(b.terminate().success());
        let err = a.stderr();
        assert_eq!(err.matches("cannot raise").count(), 1, "one line: {err}");
    }
}

/// `spin_looks` of every `tunfwd: stats` line of `out`, in order.
fn spin_looks_per_line(out: &str) -> Vec<u64> {
    out.lines()
        .filter(|l| l.starts_with("tunfwd: stats t="))
        .map(|l| stat(l, "stats", "spin_looks"))
        .collect()
}

/// `--spin`: after packets, a worker looks again instead of sleeping
/// (counted), and once the window has passed without packets it sleeps:
/// the count stops rising (two stats lines a second apart agree).
#[test]
fn spin_looks_after_packets_then_sleeps() {
    let test = "spin_looks_after_packets_then_sleeps";
    if !can_run_kernel_tests(test) {
        return;
    }
    for engine in engines(test) {
        let topo = Topology::new();
        let extra = [
            "--engine",
            engine,
            "--spin",
            "10000",
            "--stats-interval",
            "1",
        ];
        let (mut a, mut b) = start_pair(&topo, &extra);
        assert!(topo.a.ping(OVERLAY_B), "{engine}: ping");
        for p in [&mut a, &mut b] {
            let lines_before = spin_looks_per_line(&p.stdout()).len();
            p.wait_until("spin_looks above 0 and then steady", |p| {
                let looks = spin_looks_per_line(&p.stdout());
                let after = &looks[lines_before.min(looks.len())..];
                match after {
                    [.., x, y] if x == y && *y > 0 => Some(()),
                    _ => None,
                }
            });
        }
        assert!(a.terminate().success(), "{engine}");
        assert!(b.terminate().success(), "{engine}");
        // The default: io_uring looks for 100 us, poll does not look;
        // --spin 0: no looks.
        for (flags, looks) in [(&[][..], engine == "uring"), (&["--spin", "0"][..], false)] {
            let mut args = vec!["--engine", engine];
            args.extend_from_slice(flags);
            let (mut a, mut b) = start_pair(&topo, &args);
            assert!(topo.a.ping(OVERLAY_B), "{engine} {flags:?}: ping");
            assert!(a.terminate().success());
            assert!(b.terminate().success());
            for p in [&a, &b] {
                let out = p.stdout();
                assert_eq!(
                    stat(&out, "summary total", "spin_looks") > 0,
                    looks,
                    "{engine} {flags:?}: {out}"
                );
                assert!(stat(&out, "summary total", "packets") > 0, "{out}");
            }
        }
    }
}
