//! TAP mode with VXLAN encapsulation (RFC 7348), against the Linux kernel's
//! own vxlan device and tunfwd to tunfwd, under both engines. Needs root.

#![cfg(target_os = "linux")]

mod common;

use std::net::SocketAddr;

use common::*;

#[test]
fn tap_vxlan_against_kernel_vxlan() {
    if !can_run_kernel_tests("tap_vxlan_against_kernel_vxlan") {
        return;
    }
    for engine in engines("tap_vxlan_against_kernel_vxlan") {
        let topo = Topology::new();
        let mut a = Proc::tunfwd(&topo.a, &tap_args(true, engine, &[]));
        topo.b.ip(&[
            "link", "add", "vxlan0", "type", "vxlan", "id", "42", "local", UNDERLAY_B, "remote",
            UNDERLAY_A, "dstport", "4789", "dev", "veth0",
        ]);
        topo.b
            .ip(&["addr", "add", "198.19.2.2/24", "dev", "vxlan0"]);
        topo.b.ip(&["link", "set", "vxlan0", "up"]);
        // On one host the kernel's packets cross veth with checksums left
        // for the (absent) NIC; on a wire they would be complete. Ask the
        // kernel side for complete checksums, as a NIC would deliver.
        assert!(
            topo.b.run_ok(&["ethtool", "-K", "vxlan0", "tx", "off"]),
            "ethtool -K vxlan0 tx off"
        );
        assert!(
            topo.a.ping("198.19.2.2"),
            "{engine}: tunfwd -> kernel vxlan (ARP, then ICMP)"
        );
        assert!(
            topo.b.ping("198.19.2.1"),
            "{engine}: kernel vxlan -> tunfwd"
        );
        let to_b: SocketAddr = "198.19.2.2:7000".parse().unwrap();
        let to_a: SocketAddr = "198.19.2.1:7001".parse().unwrap();
        verified_tcp_transfer(&topo.a, &topo.b, to_b, 8 << 20);
        verified_tcp_transfer(&topo.b, &topo.a, to_a, 8 << 20);
        assert!(a.terminate().success());
        let out = a.stdout();
        assert_eq!(stat(&out, "summary total", "wrong_vni"), 0, "{out}");
    }
}

#[test]
fn tap_vxlan_tunfwd_to_tunfwd() {
    if !can_run_kernel_tests("tap_vxlan_tunfwd_to_tunfwd") {
        return;
    }
    let pairs = [("poll", "poll"), ("uring", "uring"), ("uring", "poll")];
    for (ea, eb) in pairs
        .into_iter()
        .filter(|&(a, _)| a == "poll" || uring_usable("tap_vxlan_tunfwd_to_tunfwd"))
    {
        let topo = Topology::new();
        let mut a = Proc::tunfwd(&topo.a, &tap_args(true, ea, &[]));
        let mut b = Proc::tunfwd(&topo.b, &tap_args(false, eb, &[]));
        assert!(topo.a.ping("198.19.2.2"), "{ea}/{eb}: ping v4");
        // IPv6 addresses on an Ethernet device wait for duplicate address
        // detection (about a second) before they can be used.
        let pinged = (0..10).any(|_| {
            topo.b.ping("2001:db8:2::1") || {
                std::thread::sleep(std::time::Duration::from_millis(500));
                false
            }
        });
        assert!(pinged, "{ea}/{eb}: ping v6");
        let to_b: SocketAddr = "198.19.2.2:7000".parse().unwrap();
        verified_tcp_transfer(&topo.a, &topo.b, to_b, 8 << 20);
        assert!(a.terminate().success());
        assert!(b.terminate().success());
    }
}

#[test]
fn tap_flag_errors() {
    for (args, want) in [
        (vec!["--mode", "tap"], "--mode tap needs --vni"),
        (vec!["--encap", "vxlan"], "use it with --mode tap"),
        (vec!["--vni", "5"], "--vni applies to --mode tap only"),
        (
            vec!["--mode", "tap", "--vni", "16777216"],
            "--vni 16777216 is out of range",
        ),
        (
            vec!["--mac", "01:00:00:00:00:01", "--mode", "tap", "--vni", "1"],
            "multicast",
        ),
        (
            vec!["--mac", "02:00:00:00:00:01"],
            "--mac applies to --mode tap only",
        ),
    ] {
        let mut full = vec!["tunnel", "--listen", "127.0.0.1:0", "--peer", "127.0.0.1:9"];
        full.extend(&args);
        let out = std::process::Command::new(tunfwd_bin())
            .args(&full)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

/// TAP mode against the kernel's vxlan at every MTU a user is likely to
/// pick, both engines: full-size frames from the kernel must fit tunfwd's
/// receive buffers (a frame is the MTU plus an Ethernet header, behind the
/// VXLAN header), so TCP carries verified data both ways. The underlay is
/// sized for the overlay (MTU + 50 bytes of VXLAN, UDP, IP and Ethernet
/// headers: 9050 bytes for a jumbo overlay).
#[test]
fn tap_vxlan_every_mtu_against_kernel_vxlan() {
    if !can_run_kernel_tests("tap_vxlan_every_mtu_against_kernel_vxlan") {
        return;
    }
    for mtu in [1280u32, 1420, 1450, 1472, 1500, 9000] {
        for engine in engines("tap_vxlan_every_mtu_against_kernel_vxlan") {
            let topo = Topology::new();
            let underlay = (mtu + 50).max(1500).to_string();
            for ns in [&topo.a, &topo.b] {
                ns.ip(&["link", "set", "veth0", "mtu", &underlay]);
            }
            let mut a = Proc::tunfwd(&topo.a, &tap_args_mtu(true, engine, mtu, &[]));
            topo.b.ip(&[
                "link", "add", "vxlan0", "type", "vxlan", "id", "42", "local", UNDERLAY_B,
                "remote", UNDERLAY_A, "dstport", "4789", "dev", "veth0",
            ]);
            topo.b
                .ip(&["link", "set", "vxlan0", "mtu", &mtu.to_string()]);
            topo.b
                .ip(&["addr", "add", "198.19.2.2/24", "dev", "vxlan0"]);
            topo.b.ip(&["link", "set", "vxlan0", "up"]);
            assert!(
                topo.b.run_ok(&["ethtool", "-K", "vxlan0", "tx", "off"]),
                "ethtool -K vxlan0 tx off"
            );
            let what = format!("{engine}, MTU {mtu}");
            assert!(topo.a.ping("198.19.2.2"), "{what}: tunfwd -> kernel vxlan");
            let to_b: SocketAddr = "198.19.2.2:7000".parse().unwrap();
            let to_a: SocketAddr = "198.19.2.1:7001".parse().unwrap();
            verified_tcp_transfer(&topo.a, &topo.b, to_b, 4 << 20);
            verified_tcp_transfer(&topo.b, &topo.a, to_a, 4 << 20);
            assert!(a.terminate().success(), "{what}");
            let out = a.stdout();
            assert_eq!(stat(&out, "summary total", "over_mtu"), 0, "{what}: {out}");
            // Frames from the kernel did reach the device.
            let received = stat_values::<u64>(&out, "summary total", "packets");
            assert!(received.get(1).is_some_and(|&n| n > 0), "{what}: {out}");
        }
    }
}
