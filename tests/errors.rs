//! Setup errors: each is one line naming the operation and the object, a
//! non-zero exit, and no panic. The first tests need no root; the rest run in
//! their own namespaces and need root (under CI=true they must run).

#![cfg(target_os = "linux")]

mod common;

use std::process::{Command, Output, Stdio};

use common::*;

fn tunfwd(args: &[&str]) -> Output {
    Command::new(tunfwd_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("spawn tunfwd")
}

fn tunfwd_in(ns: &Netns, args: &[&str]) -> Output {
    let mut full = vec![tunfwd_bin()];
    full.extend_from_slice(args);
    ns.command(&full)
        .stdin(Stdio::null())
        .output()
        .expect("spawn tunfwd")
}

/// Checks a failed run: non-zero exit, `want` on stderr, no panic output.
fn assert_clean_failure(out: &Output, want: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success:\n{stderr}"
    );
    assert!(stderr.contains(want), "stderr lacks {want:?}:\n{stderr}");
    assert!(!stderr.contains("panicked"), "panic:\n{stderr}");
    assert!(
        !stderr.contains("RUST_BACKTRACE"),
        "backtrace hint:\n{stderr}"
    );
}

const LOOP: [&str; 4] = ["--listen", "127.0.0.1:0", "--peer", "127.0.0.1:9"];

#[test]
fn bad_cidr() {
    for bad in [
        "198.19.0.1",
        "198.19.0.1/33",
        "not-an-ip/24",
        "2001:db8::1/200",
    ] {
        let mut args = vec!["tunnel", "--address", bad];
        args.extend(LOOP);
        let out = tunfwd(&args);
        assert_clean_failure(&out, "--address");
        assert_eq!(out.status.code(), Some(2), "usage errors exit 2");
    }
}

#[test]
fn mtu_out_of_range() {
    for mtu in ["20", "65508"] {
        let mut args = vec!["tunnel", "--mtu", mtu];
        args.extend(LOOP);
        let out = tunfwd(&args);
        assert_clean_failure(&out, &format!("MTU {mtu} is out of range 68..=65507"));
        assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);
    }
    let mut args = vec!["tunnel", "--mtu", "1000", "--address", "2001:db8:19::1/64"];
    args.extend(LOOP);
    assert_clean_failure(&tunfwd(&args), "IPv6 minimum");
}

#[test]
fn bad_socket_addresses() {
    let out = tunfwd(&[
        "tunnel",
        "--listen",
        "198.18.0.1",
        "--peer",
        "198.18.0.2:5000",
    ]);
    assert_clean_failure(&out, "--listen");
    let out = tunfwd(&[
        "tunnel",
        "--listen",
        "0.0.0.0:5000",
        "--peer",
        "0.0.0.0:5000",
    ]);
    assert_clean_failure(&out, "--peer 0.0.0.0:5000 needs a concrete address");
}

#[test]
fn unknown_device_when_attaching() {
    let mut args = vec!["tunnel", "--attach", "--dev", "tfwnosuch0"];
    args.extend(LOOP);
    let out = tunfwd(&args);
    assert_clean_failure(&out, "attach to TUN device tfwnosuch0: no such device");
}

#[test]
fn help_explains_units_and_defaults() {
    let out = tunfwd(&["tunnel", "--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for want in [
        "--mtu <BYTES>",
        "[default: 1452]",
        "--stats-interval <SECS>",
        "--batch <PACKETS>",
        "--txqueuelen <PACKETS>",
        "--aqm <fq-codel|codel|off>",
        "[default: fq-codel]",
        "--aqm-inflight-bytes <BYTES>",
        "[default: 65536: one super-packet]",
        "--peer <ADDR:PORT[=CIDR,...]>",
        "--peers-file <FILE>",
        "--stats-peers <N>",
        "[default: 10]",
    ] {
        assert!(text.contains(want), "help lacks {want:?}:\n{text}");
    }
}

/// Every way a set of peers is refused: one line naming the flag, or the
/// file and line, before anything is created (no root needed).
#[test]
fn bad_peers_are_refused_by_name() {
    let dir = std::env::temp_dir().join(format!("tunfwd-errors-peers-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let bad_line = file(
        "bad-line",
        "# ok\n198.18.0.2:5000 198.19.0.2/32\n\n198.18.0.3:5000 198.19.0.3\n",
    );
    let no_prefix = file("no-prefix", "198.18.0.2:5000\n");
    let wrong_family = file("family", "[2001:db8::2]:5000 198.19.0.2/32\n");
    let dup = file(
        "dup",
        "198.18.0.2:5000 198.19.0.0/24\n# x\n198.18.0.3:5000 198.19.0.0/24\n",
    );
    let dup_peer = file(
        "dup-peer",
        "198.18.0.2:5000 198.19.0.0/24\n198.18.0.2:5000 198.19.1.0/24\n",
    );
    let host_bits = file("host-bits", "\n198.18.1.11:5000 198.19.0.11/24\n");
    let equals = file("equals", "198.18.1.11:5000 ==== 198.19.0.11/32\n");
    let multicast = file(
        "multicast",
        "198.18.0.2:5000 198.19.0.0/24\n224.0.0.9:5000 198.19.1.0/24\n",
    );
    let broadcast = file("broadcast", "255.255.255.255:5000 198.19.1.0/24\n");
    let missing = dir.join("missing").display().to_string();
    let base = ["tunnel", "--listen", "127.0.0.1:0"];
    let cases: Vec<(Vec<&str>, String)> = vec![
        (vec![], "no peer: give --peer ADDR:PORT".into()),
        (
            vec!["--peers-file", &bad_line],
            format!("peers file {bad_line}: line 4: \"198.19.0.3\" is not ADDRESS/PREFIX"),
        ),
        (
            vec!["--peers-file", &no_prefix],
            "line 1: peer 198.18.0.2:5000 has no prefixes".into(),
        ),
        (
            vec!["--peers-file", &wrong_family],
            format!(
                "peers file {wrong_family} line 1: peer [2001:db8::2]:5000 is IPv6 but --listen"
            ),
        ),
        (
            vec!["--peers-file", &dup],
            format!(
                "peers file {dup} line 3: prefix 198.19.0.0/24 is given to both peer \
                 198.18.0.2:5000 and peer 198.18.0.3:5000"
            ),
        ),
        (
            vec!["--peers-file", &dup_peer],
            format!("peers file {dup_peer} line 2: peer 198.18.0.2:5000 is given twice"),
        ),
        (
            vec![
                "--peer",
                "198.18.0.2:5000=198.19.0.0/24",
                "--peers-file",
                &dup_peer,
            ],
            format!("peers file {dup_peer} line 1: peer 198.18.0.2:5000 is given twice"),
        ),
        (
            vec!["--peers-file", &host_bits],
            format!("peers file {host_bits}: line 2: 198.19.0.11/24: host bits set after /24"),
        ),
        (
            vec!["--peers-file", &equals],
            format!("peers file {equals}: line 1: "),
        ),
        (
            vec!["--peers-file", &multicast],
            format!("peers file {multicast} line 2: peer 224.0.0.9:5000 is a multicast address"),
        ),
        (
            vec!["--peers-file", &broadcast],
            format!(
                "peers file {broadcast} line 1: peer 255.255.255.255:5000 is a broadcast address"
            ),
        ),
        (
            vec!["--peer", "198.18.0.2:5000=198.19.0.1/24"],
            "198.19.0.1/24: host bits set".into(),
        ),
        (
            vec!["--peers-file", &missing],
            format!("read peers file {missing}: No such file"),
        ),
        (
            vec![
                "--peer",
                "198.18.0.2:5000=198.19.0.0/24",
                "--peer",
                "198.18.0.3:5000",
            ],
            "peer 198.18.0.3:5000 has no prefixes: with several peers each needs its own".into(),
        ),
        (
            vec![
                "--peer",
                "198.18.0.2:5000=198.19.0.0/24",
                "--allow-src",
                "198.19.0.0/24",
            ],
            "--allow-src is for a single peer without prefixes".into(),
        ),
        (
            vec![
                "--peer",
                "198.18.0.2:5000=198.19.0.0/24",
                "--mode",
                "tap",
                "--vni",
                "1",
            ],
            "--mode tap carries Ethernet frames to one peer".into(),
        ),
        (
            vec!["--peer", "198.18.0.2:5000=198.19.0.0"],
            "is not ADDRESS/PREFIX".into(),
        ),
    ];
    for (extra, want) in cases {
        let mut args = base.to_vec();
        args.extend(extra.iter().copied());
        let out = tunfwd(&args);
        assert_clean_failure(&out, &want);
        // (clap's usage errors, exit 2, add a hint line.)
        if out.status.code() != Some(2) {
            assert_eq!(
                String::from_utf8_lossy(&out.stderr).lines().count(),
                1,
                "one line for {extra:?}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn flow_queue_flags_need_fq_codel() {
    let mut args = vec!["tunnel", "--aqm", "codel", "--aqm-inflight-bytes", "65536"];
    args.extend(LOOP);
    let out = tunfwd(&args);
    assert_clean_failure(&out, "--aqm-inflight-bytes applies to --aqm fq-codel only");
}

#[test]
fn port_in_use() {
    if !can_run_kernel_tests("port_in_use") {
        return;
    }
    let topo = Topology::new();
    let (tx, rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let holder = topo.a.spawn(move || {
        let _s = std::net::UdpSocket::bind(format!("{UNDERLAY_A}:{PORT}")).unwrap();
        tx.send(()).unwrap();
        let _ = done_rx.recv();
    });
    rx.recv().unwrap();
    let args: Vec<String> = tunnel_args(true, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = tunfwd_in(&topo.a, &args);
    done_tx.send(()).unwrap();
    holder.join().unwrap();
    assert_clean_failure(
        &out,
        "bind UDP socket 198.18.0.1:5000 for queue 0: Address already in use",
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("another process uses this port"));
    assert!(!topo.a.has_link("tun0"), "no device is left behind");
}

#[test]
fn missing_cap_net_admin() {
    if !can_run_kernel_tests("missing_cap_net_admin") {
        return;
    }
    let topo = Topology::new();
    let args: Vec<String> = tunnel_args(true, &[]);
    let mut full = vec![
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        tunfwd_bin(),
    ];
    full.extend(args.iter().map(String::as_str));
    let out = topo.a.command(&full).stdin(Stdio::null()).output().unwrap();
    // EACCES from open(2) where /dev/net/tun is root-only, EPERM from
    // TUNSETIFF where it is world-accessible: both name the fix.
    assert_clean_failure(&out, "open TUN queue 0 of tun0");
    assert!(String::from_utf8_lossy(&out.stderr).contains("(need root or CAP_NET_ADMIN)"));
}

#[test]
fn no_dev_net_tun() {
    if !can_run_kernel_tests("no_dev_net_tun") {
        return;
    }
    let topo = Topology::new();
    // A private mount namespace where /dev/net is an empty tmpfs.
    let args: Vec<String> = tunnel_args(true, &[]);
    let script = format!(
        "mount -t tmpfs none /dev/net && exec {} {}",
        tunfwd_bin(),
        args.join(" ")
    );
    let out = topo
        .a
        .command(&[
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_clean_failure(
        &out,
        "open TUN queue 0 of tun0: /dev/net/tun: No such file or directory",
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("modprobe tun"));
}

#[test]
fn existing_device_of_other_kind() {
    if !can_run_kernel_tests("existing_device_of_other_kind") {
        return;
    }
    let topo = Topology::new();
    let mut args: Vec<String> = tunnel_args(true, &[]);
    args[2] = "veth0".into();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = tunfwd_in(&topo.a, &args);
    assert_clean_failure(&out, "open TUN queue 0 of veth0: Invalid argument");
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a TUN device"));
}
