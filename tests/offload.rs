//! Offload against the real kernel, both engines: TSO/USO super-packets from
//! the TUN device, UDP GSO/GRO, TCP coalescing. Verified transfers with
//! offload on both sides, on one side only, and the counters that show the
//! offload paths were taken. Need root.

#![cfg(target_os = "linux")]

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

use common::*;

fn pair(topo: &Topology, a_extra: &[&str], b_extra: &[&str]) -> (Proc, Proc) {
    let a = Proc::tunfwd(&topo.a, &tunnel_args(true, a_extra));
    let b = Proc::tunfwd(&topo.b, &tunnel_args(false, b_extra));
    (a, b)
}

/// Verified TCP both ways over IPv4 and IPv6.
fn transfers(topo: &Topology) {
    let v4: SocketAddr = format!("{OVERLAY_B}:7000").parse().unwrap();
    let v6: SocketAddr = format!("[{OVERLAY6_A}]:7001").parse().unwrap();
    verified_tcp_transfer(&topo.a, &topo.b, v4, 32 << 20);
    verified_tcp_transfer(&topo.b, &topo.a, v6, 32 << 20);
}

fn ratio(text: &str, key: &str) -> f64 {
    stat_values::<f64>(text, "summary total", key)
        .first()
        .copied()
        .unwrap_or(0.0)
}

#[test]
fn offload_both_sides_segments_and_coalesces() {
    if !can_run_kernel_tests("offload_both_sides_segments_and_coalesces") {
        return;
    }
    for engine in engines("offload_both_sides_segments_and_coalesces") {
        let topo = Topology::new();
        let on = ["--engine", engine, "--offload", "on"];
        let (mut a, mut b) = pair(&topo, &on, &on);
        assert!(a.stderr().contains("offload: TSO on"), "{}", a.stderr());
        transfers(&topo);
        assert!(a.terminate().success());
        assert!(b.terminate().success());
        let (sa, sb) = (a.stdout(), b.stdout());
        // Both directions carried bulk data, so both sides segmented,
        // received coalesced datagrams, and wrote coalesced super-packets.
        for (who, s) in [("a", &sa), ("b", &sb)] {
            assert!(
                ratio(s, "segments_per_send") > 1.0,
                "{engine} {who}: no GSO sends:\n{s}"
            );
            assert!(
                ratio(s, "datagrams_per_receive") > 1.0,
                "{engine} {who}: no GRO:\n{s}"
            );
            assert!(
                ratio(s, "packets_per_tun_write") > 1.0,
                "{engine} {who}: no coalescing:\n{s}"
            );
            assert_eq!(stat(s, "summary total", "bad_offload"), 0, "{s}");
        }
    }
}

#[test]
fn offload_on_one_side_only() {
    if !can_run_kernel_tests("offload_on_one_side_only") {
        return;
    }
    for (a_extra, b_extra) in [
        (
            vec!["--engine", "poll", "--offload", "on"],
            vec!["--engine", "poll", "--offload", "off"],
        ),
        (
            vec!["--engine", "poll", "--offload", "on"],
            vec!["--engine", "uring", "--offload", "off"],
        ),
        (
            vec!["--engine", "uring", "--offload", "on"],
            vec!["--engine", "poll", "--offload", "off"],
        ),
        (
            vec!["--engine", "uring", "--offload", "on"],
            vec!["--engine", "uring", "--multishot", "off"],
        ),
    ]
    .into_iter()
    .filter(|(a, b)| {
        !(a.contains(&"uring") || b.contains(&"uring")) || uring_usable("offload_on_one_side_only")
    }) {
        let topo = Topology::new();
        let (mut a, mut b) = pair(&topo, &a_extra, &b_extra);
        assert!(topo.a.ping(OVERLAY_B));
        transfers(&topo);
        assert!(a.terminate().success(), "{a_extra:?}");
        assert!(b.terminate().success(), "{b_extra:?}");
    }
}

/// An application sending with UDP GSO through the tunnel makes the TUN
/// device hand over USO super-packets: every datagram still arrives, intact,
/// as its own datagram.
#[test]
fn udp_segmentation_offload_through_tunnel() {
    if !can_run_kernel_tests("udp_segmentation_offload_through_tunnel") {
        return;
    }
    for engine in engines("udp_segmentation_offload_through_tunnel") {
        uso_through_tunnel(engine);
    }
}

fn uso_through_tunnel(engine: &str) {
    let topo = Topology::new();
    let on = ["--engine", engine, "--offload", "on"];
    let (mut a, mut b) = pair(&topo, &on, &on);
    const SENDS: usize = 40;
    const PER_SEND: usize = 16;
    const SIZE: usize = 1000;
    let (bound, ready) = std::sync::mpsc::channel();
    let receiver = topo.b.spawn(move || {
        let s = UdpSocket::bind(format!("{OVERLAY_B}:7100")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        bound.send(()).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.recv(&mut buf) {
            got.push(buf[..n].to_vec());
            if got.len() == SENDS * PER_SEND {
                break;
            }
        }
        got
    });
    ready
        .recv_timeout(Duration::from_secs(10))
        .expect("receiver bound");
    topo.a
        .spawn(|| {
            use nix::sys::socket::{ControlMessage, MsgFlags, SockaddrStorage, sendmsg};
            let s = UdpSocket::bind(format!("{OVERLAY_A}:0")).unwrap();
            let dst: SocketAddr = format!("{OVERLAY_B}:7100").parse().unwrap();
            let dst = SockaddrStorage::from(dst);
            let seg = SIZE as u16;
            for i in 0..SENDS {
                let mut data = Vec::with_capacity(SIZE * PER_SEND);
                for j in 0..PER_SEND {
                    let mut d = vec![(i * PER_SEND + j) as u8; SIZE];
                    d[..4].copy_from_slice(&((i * PER_SEND + j) as u32).to_be_bytes());
                    data.extend_from_slice(&d);
                }
                sendmsg(
                    s.as_raw_fd(),
                    &[std::io::IoSlice::new(&data)],
                    &[ControlMessage::UdpGsoSegments(&seg)],
                    MsgFlags::empty(),
                    Some(&dst),
                )
                .expect("GSO send through the tunnel");
                std::thread::sleep(Duration::from_millis(5));
            }
        })
        .join()
        .unwrap();
    let got = receiver.join().unwrap();
    assert_eq!(got.len(), SENDS * PER_SEND, "datagrams received");
    let mut ids: Vec<u32> = got
        .iter()
        .map(|d| {
            assert_eq!(d.len(), SIZE);
            let id = u32::from_be_bytes(d[..4].try_into().unwrap());
            assert!(
                d[4..].iter().all(|&b| b == id as u8),
                "datagram {id} corrupted"
            );
            id
        })
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..(SENDS * PER_SEND) as u32).collect::<Vec<_>>());
    assert!(a.terminate().success());
    assert!(b.terminate().success());
    let sa = a.stdout();
    assert!(
        ratio(&sa, "segments_per_send") > 1.0,
        "{engine}: USO super-packets were not segmented:\n{sa}"
    );
}

/// `--offload on` needs multishot receives in the uring engine: refused
/// clearly when they are turned off.
#[test]
fn offload_on_needs_multishot_with_uring() {
    let out = std::process::Command::new(tunfwd_bin())
        .args([
            "tunnel",
            "--engine",
            "uring",
            "--offload",
            "on",
            "--multishot",
            "off",
            "--listen",
            "127.0.0.1:0",
            "--peer",
            "127.0.0.1:9",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(!err.contains("panicked"), "{err}");
    // Where io_uring itself is unavailable that error comes first.
    if !err.contains("set up io_uring") {
        assert!(
            err.contains("--offload on: the uring engine needs multishot receives"),
            "{err}"
        );
    }
}
