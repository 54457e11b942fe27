//! Queue management against the real kernel, both engines: CoDel at the
//! receiving forwarder, and the flow queues at the sending one, with a
//! target so small that every stream meets it, signal ECN-capable TCP with
//! CE marks (which reach the receiver, and no packet is lost to them) and
//! other TCP with drops (counted); either way a verified transfer arrives
//! byte for byte, and pings sent while it runs all come back. Needs root.

#![cfg(target_os = "linux")]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use common::*;

/// `IpExt InCEPkts` of `ns`: IP packets received with the CE mark.
fn in_ce_packets(ns: &Netns) -> u64 {
    kernel_counter(ns, "/proc/net/netstat", "IpExt", "InCEPkts")
}

#[test]
fn codel_marks_ecn_capable_tcp_and_drops_the_rest() {
    if !can_run_kernel_tests("codel_marks_ecn_capable_tcp_and_drops_the_rest") {
        return;
    }
    for engine in engines("codel_marks_ecn_capable_tcp_and_drops_the_rest") {
        for ecn in [true, false] {
            let what = format!("{engine}, ECN {}", if ecn { "on" } else { "off" });
            let topo = Topology::new();
            set_tcp_ecn(&topo, ecn);
            // Target 1 us: every datagram waits longer in the socket than
            // that, so CoDel acts after each 200 us interval.
            let extra = [
                "--engine",
                engine,
                "--aqm-target-us",
                "1",
                "--aqm-interval-us",
                "200",
            ];
            let mut a = Proc::tunfwd(&topo.a, &tunnel_args(true, &extra));
            let mut b = Proc::tunfwd(&topo.b, &tunnel_args(false, &extra));
            let ce_before = in_ce_packets(&topo.b);
            let dst: SocketAddr = format!("{OVERLAY_B}:7000").parse().unwrap();
            verified_tcp_transfer(&topo.a, &topo.b, dst, 16 << 20);
            let ce_after = in_ce_packets(&topo.b);
            assert!(a.terminate().success(), "{what}");
            assert!(b.terminate().success(), "{what}");
            let out = b.stdout();
            let marks = stat(&out, "summary total", "aqm_marks");
            let drops = stat(&out, "summary total", "aqm_drops");
            eprintln!(
                "{what}: aqm_marks={marks} aqm_drops={drops} InCEPkts +{}",
                ce_after - ce_before
            );
            if ecn {
                assert!(marks > 0, "{what}: no CE marks\n{out}");
                assert_eq!(drops, 0, "{what}: ECN-capable packets were dropped\n{out}");
                assert!(
                    ce_after - ce_before >= marks,
                    "{what}: {marks} marks but only {} CE packets arrived",
                    ce_after - ce_before
                );
            } else {
                assert!(drops > 0, "{what}: no AQM drops\n{out}");
                assert_eq!(marks, 0, "{what}: marks without ECN\n{out}");
            }
        }
    }
}

/// Sets `net.ipv4.tcp_ecn` in both namespaces (it is per namespace: written
/// from a thread inside each one).
fn set_tcp_ecn(topo: &Topology, on: bool) {
    for ns in [&topo.a, &topo.b] {
        let value = if on { "1" } else { "0" };
        ns.spawn(move || std::fs::write("/proc/sys/net/ipv4/tcp_ecn", value))
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("set net.ipv4.tcp_ecn: {e}"));
    }
}

#[test]
fn flow_queues_at_the_sender_signal_tcp_while_pings_pass() {
    let test = "flow_queues_at_the_sender_signal_tcp_while_pings_pass";
    if !can_run_kernel_tests(test) {
        return;
    }
    const BYTES: u64 = 512 << 20;
    for engine in engines(test) {
        for ecn in [true, false] {
            let what = format!("{engine}, ECN {}", if ecn { "on" } else { "off" });
            let topo = Topology::new();
            set_tcp_ecn(&topo, ecn);
            // Only the sender manages its queue (the receiver's CoDel is
            // off): every mark or drop below is the flow queues'. Target
            // 1 us: every packet queued at all is over it.
            let mut a = Proc::tunfwd(
                &topo.a,
                &tunnel_args(
                    true,
                    &[
                        "--engine",
                        engine,
                        "--aqm",
                        "fq-codel",
                        "--aqm-target-us",
                        "1",
                        "--aqm-interval-us",
                        "200",
                    ],
                ),
            );
            let mut b = Proc::tunfwd(
                &topo.b,
                &tunnel_args(false, &["--engine", engine, "--aqm", "off"]),
            );
            let ce_before = in_ce_packets(&topo.b);
            let dst: SocketAddr = format!("{OVERLAY_B}:7000").parse().unwrap();
            let progress = Arc::new(AtomicU64::new(0));
            let p = progress.clone();
            let (from, to) = (Netns::existing(&topo.a.name), Netns::existing(&topo.b.name));
            let transfer = std::thread::spawn(move || {
                verified_tcp_transfer_observed(&from, &to, dst, BYTES, Some(p), None)
            });
            // Once the stream runs, pings through the tunnel in the same
            // direction: each must come back.
            while progress.load(Ordering::Relaxed) < 1 << 20 {
                assert!(!transfer.is_finished(), "{what}: transfer ended early");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            let ping = topo
                .a
                .command(&[
                    "ping", "-q", "-c", "20", "-i", "0.005", "-W", "2", OVERLAY_B,
                ])
                .output()
                .expect("run ping");
            let during = progress.load(Ordering::Relaxed);
            assert_eq!(transfer.join().expect("transfer"), BYTES, "{what}");
            let ce_after = in_ce_packets(&topo.b);
            assert!(a.terminate().success(), "{what}");
            assert!(b.terminate().success(), "{what}");
            let out = a.stdout();
            assert!(
                during < BYTES,
                "{what}: the transfer was over before the pings were (make it longer)"
            );
            // "20 packets transmitted, 20 received, ..."
            let ping_out = String::from_utf8_lossy(&ping.stdout).to_string();
            let replies: u64 = ping_out
                .split(", ")
                .find_map(|f| f.strip_suffix(" received")?.parse().ok())
                .unwrap_or_else(|| panic!("{what}: ping said {ping_out}"));
            // The sending side (tun_to_peer) and the receiving side.
            let total = "summary total";
            let marks = stat(&out, total, "aqm_marks");
            let tx_drops = direction_stat(&out, total, "tun_to_peer", "aqm");
            let rx_drops = direction_stat(&out, total, "peer_to_tun", "aqm");
            let queue_max = direction_stat(&out, total, "tun_to_peer", "queue_max");
            eprintln!(
                "{what}: flow queues: aqm_marks={marks} aqm drops={tx_drops} queue_max={queue_max}; \
                 InCEPkts +{}; pings {replies}/20, receive-side CoDel drops {rx_drops}",
                ce_after - ce_before
            );
            assert!(
                queue_max >= 1,
                "{what}: nothing went through the flow queues\n{out}"
            );
            // Every ping comes back: a ping is a sparse flow on both sides'
            // flow queues, served from the new flows, where CoDel never
            // acts, whatever the bulk flow's queue.
            assert_eq!(
                replies, 20,
                "{what}: pings lost under load ({rx_drops} receive-side CoDel drops)\n{ping_out}\n{out}"
            );
            if ecn {
                assert!(marks > 0, "{what}: no CE marks\n{out}");
                assert_eq!(
                    tx_drops, 0,
                    "{what}: ECN-capable packets were dropped\n{out}"
                );
                assert!(
                    ce_after - ce_before >= marks,
                    "{what}: {marks} marks but only {} CE packets arrived",
                    ce_after - ce_before
                );
            } else {
                assert!(tx_drops > 0, "{what}: no AQM drops\n{out}");
                assert_eq!(marks, 0, "{what}: marks without ECN\n{out}");
            }
        }
    }
}
