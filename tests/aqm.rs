//! Queue management against the real kernel, both engines: CoDel at the
//! receiving forwarder, with a target so small that every stream meets it,
//! signals ECN-capable TCP with CE marks (which reach the receiver, and no
//! packet is lost to them) and other TCP with drops (counted); either way a
//! verified transfer arrives byte for byte. Needs root.

#![cfg(target_os = "linux")]

mod common;

use std::net::SocketAddr;

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
            // net.ipv4.tcp_ecn is per namespace: written from a thread
            // inside each one.
            for ns in [&topo.a, &topo.b] {
                let value = if ecn { "1" } else { "0" };
                ns.spawn(move || std::fs::write("/proc/sys/net/ipv4/tcp_ecn", value))
                    .join()
                    .unwrap()
                    .unwrap_or_else(|e| panic!("set net.ipv4.tcp_ecn: {e}"));
            }
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
