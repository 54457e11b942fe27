//! The forwarder as a security boundary, against the real kernel, under both
//! engines: `--allow-src` stops a peer from spoofing inner sources, floods of
//! malformed datagrams (from the peer's own address and port, and from a
//! stranger) are all counted and none reaches the device while a verified
//! transfer runs, and tunfwd keeps forwarding after dropping root (`--user`)
//! or when started without root through a file capability. Needs root.

#![cfg(target_os = "linux")]

mod common;

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::*;
use tunfwd::forward::{Forwarder, PeerVerdict};

/// Malformed datagrams per hostile sender.
const HOSTILE_COUNT: usize = 100_000;
/// The tunnel MTU of `tunnel_args` (the default).
const MTU: usize = 1452;
/// The VNI of `tap_args`.
const VNI: u32 = 42;

/// A small deterministic PRNG (xorshift64*), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }

    /// Random bytes, `lo..=hi` of them.
    fn bytes_in(&mut self, lo: usize, hi: usize) -> Vec<u8> {
        let len = self.range(lo, hi);
        self.bytes(len)
    }
}

/// Malformed datagram number `i` for TUN mode, at most `max_len` bytes:
/// zero-length, random bytes with a bad version, truncated IPv4 and IPv6
/// headers, IHL < 5, wrong IPv4 total length, wrong IPv6 payload length,
/// and oversize (well-formed but above the tunnel MTU).
fn malformed_ip(i: usize, rng: &mut Rng, max_len: usize) -> Vec<u8> {
    match i % 8 {
        0 => Vec::new(),
        1 => {
            let mut p = rng.bytes_in(1, max_len);
            let bad = [0u8, 1, 2, 3, 5, 7, 8, 9, 10, 11, 12, 13, 14, 15];
            p[0] = (bad[rng.below(bad.len())] << 4) | (p[0] & 0x0f);
            p
        }
        2 => {
            let mut p = rng.bytes_in(1, 19);
            p[0] = 0x45;
            p
        }
        3 => {
            let mut p = rng.bytes_in(1, 39);
            p[0] = 0x60;
            p
        }
        4 => {
            let mut p = rng.bytes_in(20, max_len.min(MTU));
            p[0] = 0x40 | rng.below(5) as u8;
            p
        }
        5 => {
            let len = rng.range(20, max_len.min(MTU));
            let mut p = rng.bytes(len);
            p[0] = 0x45;
            let wrong = (len + 1 + rng.below(60_000)) as u16;
            p[2..4].copy_from_slice(&wrong.to_be_bytes());
            p
        }
        6 => {
            let len = rng.range(40, max_len.min(MTU));
            let mut p = rng.bytes(len);
            p[0] = 0x60;
            let wrong = (len - 40 + 1 + rng.below(60_000)) as u16;
            p[4..6].copy_from_slice(&wrong.to_be_bytes());
            p
        }
        _ => {
            let len = rng.range(MTU + 1, max_len);
            let mut p = rng.bytes(len);
            p[0] = 0x45;
            p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            p
        }
    }
}

/// Malformed datagram number `i` for TAP/VXLAN mode with VNI `vni`.
fn malformed_vxlan(i: usize, rng: &mut Rng, vni: u32) -> Vec<u8> {
    let header = |flags: u8, vni: u32| {
        let mut h = vec![flags, 0, 0, 0];
        h.extend_from_slice(&(vni << 8).to_be_bytes());
        h
    };
    match i % 6 {
        0 => Vec::new(),
        1 => rng.bytes_in(1, 7),
        2 => {
            // I flag clear, random other bits.
            let mut p = header(rng.next() as u8 & !0x08, vni);
            p.extend(rng.bytes_in(14, 1400));
            p
        }
        3 => {
            let mut p = header(0x08, (vni + 1 + rng.below(1000) as u32) & 0xff_ffff);
            p.extend(rng.bytes_in(14, 1400));
            p
        }
        4 => {
            let mut p = header(0x08, vni);
            p.extend(rng.bytes_in(1, 13));
            p
        }
        _ => {
            let mut p = header(0x08, vni);
            p.extend(rng.bytes_in(1450 + 18 + 5, 9000));
            p
        }
    }
}

fn status_field<'a>(status: &'a str, key: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("{key} in {status}"))
        .trim()
}

/// The kernel's counters of bad IP packets received in `ns` (what a
/// malformed packet written into the TUN device would raise), plus the
/// device's own receive errors and drops.
fn bad_packet_counters(ns: &Netns, dev: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let snmp = String::from_utf8_lossy(
        &ns.command(&["cat", "/proc/net/snmp"])
            .output()
            .unwrap()
            .stdout,
    )
    .to_string();
    let lines: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Ip:")).collect();
    if let [names, values] = lines[..] {
        for (n, v) in names
            .split_whitespace()
            .zip(values.split_whitespace())
            .skip(1)
        {
            if [
                "InHdrErrors",
                "InAddrErrors",
                "InTruncatedPkts",
                "InUnknownProtos",
            ]
            .contains(&n)
            {
                out.insert(format!("Ip{n}"), v.parse().unwrap());
            }
        }
    }
    let snmp6 = String::from_utf8_lossy(
        &ns.command(&["cat", "/proc/net/snmp6"])
            .output()
            .unwrap()
            .stdout,
    )
    .to_string();
    for l in snmp6.lines() {
        let mut it = l.split_whitespace();
        if let (Some(n), Some(v)) = (it.next(), it.next()) {
            if [
                "Ip6InHdrErrors",
                "Ip6InAddrErrors",
                "Ip6InTruncatedPkts",
                "Ip6InUnknownProtos",
            ]
            .contains(&n)
            {
                out.insert(n.to_string(), v.parse().unwrap());
            }
        }
    }
    for stat in ["rx_errors", "rx_dropped", "rx_length_errors"] {
        let o = ns
            .command(&["cat", &format!("/sys/class/net/{dev}/statistics/{stat}")])
            .output()
            .unwrap();
        let v = String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse()
            .unwrap_or(0);
        out.insert(format!("{dev}_{stat}"), v);
    }
    out
}

/// Verified TCP transfers from `from` to `to` until `stop` is set (at least
/// one); returns how many completed, each checked byte for byte.
fn transfers_until(from: &Netns, to: &Netns, dst: SocketAddr, stop: &AtomicBool) -> usize {
    let mut n = 0;
    while n == 0 || !stop.load(Ordering::Relaxed) {
        verified_tcp_transfer(from, to, dst, 8 << 20);
        n += 1;
    }
    n
}

#[test]
fn allow_src_drops_spoofed_inner_sources() {
    if !can_run_kernel_tests("allow_src_drops_spoofed_inner_sources") {
        return;
    }
    for engine in engines("allow_src_drops_spoofed_inner_sources") {
        let topo = Topology::new();
        let mut a = Proc::tunfwd(
            &topo.a,
            &tunnel_args(
                true,
                &[
                    "--engine",
                    engine,
                    "--allow-src",
                    "198.19.0.2/32",
                    "--allow-src",
                    "2001:db8:19::/112",
                ],
            ),
        );
        let _b = Proc::tunfwd(&topo.b, &tunnel_args(false, &["--engine", engine]));
        // b's own addresses are allowed.
        assert!(topo.b.ping(OVERLAY_A), "{engine}: allowed v4 source");
        assert!(topo.b.ping(OVERLAY6_A), "{engine}: allowed v6 source");
        // b spoofs: sources it owns but a does not allow.
        topo.b.ip(&["addr", "add", "198.19.0.77/32", "dev", "tun0"]);
        topo.b.ip(&[
            "addr",
            "add",
            "2001:db8:1919::77/128",
            "dev",
            "tun0",
            "nodad",
        ]);
        // Pings from those sources get no reply.
        let ping_from = |src: &str, dst: &str| {
            topo.b
                .run_ok(&["ping", "-c", "3", "-i", "0.2", "-W", "1", "-I", src, dst])
        };
        assert!(!ping_from("198.19.0.77", OVERLAY_A));
        assert!(!ping_from("2001:db8:1919::77", OVERLAY6_A));
        assert!(a.terminate().success());
        let out = a.stdout();
        // 6 echo requests, plus whatever else the kernel sent from those
        // sources (an IPv6 neighbour or router message); nothing else drops.
        let refused = stat(&out, "summary total", "source_not_allowed");
        assert!(refused >= 6, "{engine}: {out}");
        assert_eq!(stat_sum(&out, "summary total", "drops"), refused, "{out}");
    }
}

/// One hostile-input run: the tunnel, the floods, what must be counted.
struct Hostile {
    /// The device whose receive errors must not move.
    dev: &'static str,
    /// Tunnel flags of side a (under attack) and side b.
    args: fn(bool, &str, &[&str]) -> Vec<String>,
    /// The peer's address and port as side a knows it, and where the
    /// peer's flood comes from: exactly there through a raw socket (TUN
    /// mode: the peer's forwarder holds that port), or from a socket of its
    /// own (TAP mode accepts any port of the peer's address; the kernel
    /// fragments the oversize datagrams, which a raw socket cannot send).
    peer: SocketAddr,
    raw_from_peer: bool,
    /// Side a's listening address.
    target: SocketAddr,
    /// Where the verified transfers go (side a's overlay address).
    dst: SocketAddr,
    /// Malformed datagrams per sender, and each sender's pace.
    count: usize,
    pps: usize,
    /// Datagram `i` from the peer, and from the stranger.
    from_peer: fn(usize, &mut Rng) -> Vec<u8>,
    from_stranger: fn(usize, &mut Rng) -> Vec<u8>,
    /// The forwarder the tunnel runs, for the expected verdicts.
    reference: Forwarder,
}

/// The stranger's address: on side b's veth, not the peer's.
const STRANGER: &str = "198.18.1.2";
const PEER_SEED: u64 = 0x5eed;
const STRANGER_SEED: u64 = 0xbad;

impl Hostile {
    /// What the forwarder must count for each flood: computed by the pure
    /// core, which also proves each datagram is rejected.
    fn expected(&self) -> BTreeMap<&'static str, u64> {
        let stranger: SocketAddr = format!("{STRANGER}:{}", self.peer.port()).parse().unwrap();
        let mut expected: BTreeMap<&'static str, u64> = BTreeMap::new();
        for (src, seed, make) in [
            (self.peer, PEER_SEED, self.from_peer),
            (stranger, STRANGER_SEED, self.from_stranger),
        ] {
            let mut rng = Rng(seed);
            for i in 0..self.count {
                let p = make(i, &mut rng);
                match self.reference.handle_from_peer(src, &p) {
                    PeerVerdict::Drop(r) => *expected.entry(r.name()).or_default() += 1,
                    d => panic!("generator made an acceptable datagram ({d:?}): {p:02x?}"),
                }
            }
        }
        expected
    }

    /// Floods side a under `engine` from the peer's own address and port
    /// and from a stranger while verified transfers run, then checks: every
    /// datagram is counted under its expected reason (exactly, unless the
    /// kernel dropped some at the receive buffer, which are then counted
    /// there), the kernel's bad-packet counters and the device's receive
    /// errors do not move, the transfers complete byte for byte, and RSS
    /// grows by less than 16 MiB.
    fn run(&self, engine: &str) {
        let expected = self.expected();
        assert!(expected.len() >= 5, "{expected:?}");
        let total = 2 * self.count as u64;
        let topo = Topology::new();
        topo.b
            .ip(&["addr", "add", &format!("{STRANGER}/32"), "dev", "veth0"]);
        topo.a
            .ip(&["route", "add", "198.18.1.0/24", "dev", "veth0"]);
        let extra = ["--rcvbuf", "8388608", "--stats-interval", "1"];
        let mut a = Proc::tunfwd(&topo.a, &(self.args)(true, engine, &extra));
        let mut b = Proc::tunfwd(&topo.b, &(self.args)(false, engine, &extra[..2]));
        // Warm up (buffers touched), then take the baseline.
        verified_tcp_transfer(&topo.b, &topo.a, self.dst, 8 << 20);
        let pid = a.child.id();
        let rss_before = rss_kib(pid);
        let counters_before = bad_packet_counters(&topo.a, self.dev);

        let (peer, target, count, pps) = (self.peer, self.target, self.count, self.pps);
        let (make_peer, make_stranger, raw) =
            (self.from_peer, self.from_stranger, self.raw_from_peer);
        let stop = Arc::new(AtomicBool::new(false));
        let from_peer = topo.b.spawn(move || {
            let mut rng = Rng(PEER_SEED);
            if raw {
                let mut raw = RawUdp::new(peer, target);
                paced(count, pps, |i| raw.send(&make_peer(i, &mut rng)));
            } else {
                let s = UdpSocket::bind(peer).unwrap();
                paced(count, pps, |i| {
                    let _ = s.send_to(&make_peer(i, &mut rng), target);
                });
            }
        });
        let from_stranger = topo.b.spawn(move || {
            let s = UdpSocket::bind(format!("{STRANGER}:{}", peer.port())).unwrap();
            let mut rng = Rng(STRANGER_SEED);
            // A stranger's datagrams may be any size (fragmented on the wire).
            paced(count, pps, |i| {
                let _ = s.send_to(&make_stranger(i, &mut rng), target);
            });
        });
        let transfers = {
            let stop2 = stop.clone();
            let (ta, tb, dst) = (&topo.b, &topo.a, self.dst);
            std::thread::scope(|sc| {
                let h = sc.spawn(|| transfers_until(ta, tb, dst, &stop2));
                let floods = (from_peer.join(), from_stranger.join());
                // Stop the transfers even if a flood failed, then report.
                stop.store(true, Ordering::Relaxed);
                let n = h.join().unwrap();
                floods.0.unwrap();
                floods.1.unwrap();
                n
            })
        };
        // Every datagram sent has been dealt with: counted by tunfwd (by
        // its reason, or as an overload drop) or dropped by the kernel at
        // the receive buffer.
        let dealt_with = |line: &str| {
            expected.keys().map(|r| stat(line, "stats", r)).sum::<u64>()
                + stat(line, "stats", "udp_rcvbuf_drops")
                + stat_sum(line, "stats", "overload")
        };
        a.wait_for_stats("every hostile datagram dealt with", |l| {
            dealt_with(l) >= total
        });
        let rss_after = rss_kib(pid);
        let counters_after = bad_packet_counters(&topo.a, self.dev);
        assert!(a.terminate().success());
        assert!(b.terminate().success());
        let out = a.stdout();
        eprintln!(
            "{engine}: {transfers} verified 8 MiB transfers during the flood; RSS {rss_before} -> {rss_after} KiB\n{out}"
        );

        assert_eq!(
            counters_before, counters_after,
            "{engine}: the kernel saw bad packets"
        );
        let kernel_drops = stat(&out, "summary kernel", "udp_rcvbuf_drops");
        // Receives the flow queues dropped under overload, before looking
        // at them (the floods' mostly; the peer-to-TUN direction's).
        let overload = direction_stat(&out, "summary total", "peer_to_tun", "overload");
        let mut counted = 0;
        for (reason, n) in &expected {
            let got = stat(&out, "summary total", reason);
            counted += got;
            if kernel_drops + overload == 0 {
                assert_eq!(got, *n, "{engine}: {reason}\n{out}");
            } else {
                assert!(got <= *n, "{engine}: {reason}\n{out}");
            }
        }
        // Every hostile datagram the kernel handed over is counted: by its
        // reason, or as an overload drop.
        assert!(
            counted + kernel_drops <= total && total <= counted + kernel_drops + overload,
            "{engine}: {counted} counted + {kernel_drops} kernel drops + {overload} overload\n{out}"
        );
        // Nothing else from the peer's side was dropped but what queue
        // management chose to (the transfers meet a queue that the floods
        // keep full). The other direction may lose a send to a transient
        // error under this load; it is counted there.
        let peer_to_tun_drops = stat_values::<u64>(&out, "summary total", "drops")[1];
        assert_eq!(
            peer_to_tun_drops,
            counted + direction_stat(&out, "summary total", "peer_to_tun", "aqm") + overload,
            "{engine}: drops other than the hostile ones\n{out}"
        );
        assert!(
            rss_after < rss_before + 16 * 1024,
            "{engine}: RSS grew from {rss_before} to {rss_after} KiB"
        );
    }
}

/// Hostile input while a verified transfer runs: 100,000 malformed
/// datagrams from the peer's own address and port (a raw socket in the
/// peer's namespace), 100,000 from a stranger; see [`Hostile::run`].
#[test]
fn hostile_input_is_counted_and_never_reaches_the_device() {
    if !can_run_kernel_tests("hostile_input_is_counted_and_never_reaches_the_device") {
        return;
    }
    let peer: SocketAddr = format!("{UNDERLAY_B}:{PORT}").parse().unwrap();
    let hostile = Hostile {
        dev: "tun0",
        args: |a, engine, extra| {
            let mut e = vec!["--engine", engine];
            e.extend_from_slice(extra);
            tunnel_args(a, &e)
        },
        peer,
        raw_from_peer: true,
        target: format!("{UNDERLAY_A}:{PORT}").parse().unwrap(),
        dst: format!("{OVERLAY_A}:7000").parse().unwrap(),
        count: HOSTILE_COUNT,
        pps: 25_000,
        from_peer: |i, rng| malformed_ip(i, rng, 1472),
        from_stranger: |i, rng| malformed_ip(i, rng, 9000),
        reference: Forwarder::new(MTU, peer),
    };
    for engine in engines("hostile_input_is_counted_and_never_reaches_the_device") {
        hostile.run(engine);
    }
}

/// The same in TAP/VXLAN mode: bad VXLAN flags, wrong VNIs, runt and
/// oversize frames from the peer's own address and port and from a
/// stranger, while verified transfers run; as strict as the TUN test.
#[test]
fn hostile_vxlan_input_is_counted() {
    if !can_run_kernel_tests("hostile_vxlan_input_is_counted") {
        return;
    }
    let peer: SocketAddr = format!("{UNDERLAY_B}:6000").parse().unwrap();
    let hostile = Hostile {
        dev: "tap0",
        args: tap_args,
        peer,
        raw_from_peer: false,
        target: format!("{UNDERLAY_A}:4789").parse().unwrap(),
        dst: "198.19.2.1:7000".parse().unwrap(),
        count: 30_000,
        pps: 20_000,
        from_peer: |i, rng| malformed_vxlan(i, rng, VNI),
        from_stranger: |i, rng| malformed_vxlan(i, rng, VNI),
        reference: Forwarder::vxlan(1450, peer, VNI),
    };
    for engine in engines("hostile_vxlan_input_is_counted") {
        hostile.run(engine);
    }
}

/// `--user nobody`: root is dropped after setup (every id and every
/// capability), and the tunnel keeps forwarding.
#[test]
fn user_flag_drops_root_and_keeps_forwarding() {
    if !can_run_kernel_tests("user_flag_drops_root_and_keeps_forwarding") {
        return;
    }
    for engine in engines("user_flag_drops_root_and_keeps_forwarding") {
        let topo = Topology::new();
        let mut a = Proc::tunfwd(
            &topo.a,
            &tunnel_args(true, &["--engine", engine, "--user", "nobody"]),
        );
        let _b = Proc::tunfwd(&topo.b, &tunnel_args(false, &["--engine", engine]));
        assert!(
            a.stderr().contains("running as uid 65534"),
            "{}",
            a.stderr()
        );
        // The process and every thread of it (workers, signal thread):
        // set*id must have applied to all, and no capability stayed.
        let mut threads = 0;
        for task in std::fs::read_dir(format!("/proc/{}/task", a.child.id())).unwrap() {
            let path = task.unwrap().path().join("status");
            let s = std::fs::read_to_string(&path).unwrap();
            for (key, want) in [
                ("Uid:", "65534\t65534\t65534\t65534"),
                ("Gid:", "65534\t65534\t65534\t65534"),
                ("Groups:", "65534"),
                ("CapInh:", "0000000000000000"),
                ("CapPrm:", "0000000000000000"),
                ("CapEff:", "0000000000000000"),
                ("CapAmb:", "0000000000000000"),
            ] {
                assert_eq!(
                    status_field(&s, key),
                    want,
                    "{engine}: {key} of {}",
                    path.display()
                );
            }
            threads += 1;
        }
        assert!(
            threads >= 3,
            "{engine}: main, signal and worker threads: {threads}"
        );
        assert!(topo.a.ping(OVERLAY_B), "{engine}");
        let dst: SocketAddr = format!("{OVERLAY_B}:7000").parse().unwrap();
        verified_tcp_transfer(&topo.a, &topo.b, dst, 16 << 20);
        assert!(a.terminate().success(), "{engine}: {}", a.stderr());
        // The device went away on exit even though we were no longer root.
        assert!(!topo.a.has_link("tun0"));
    }
}

/// Without root: the binary carries `cap_net_admin+ep` and runs as
/// nobody; it creates and configures the device and forwards.
#[test]
fn runs_without_root_via_file_capability() {
    if !can_run_kernel_tests("runs_without_root_via_file_capability") {
        return;
    }
    if std::process::Command::new("setcap")
        .arg("-h")
        .output()
        .is_err()
    {
        let msg =
            "runs_without_root_via_file_capability: needs setcap (apt-get install -y libcap2-bin)";
        let skip = std::env::var("TUNFWD_SKIP_KERNEL_TESTS").as_deref() == Ok("1");
        assert!(
            skip && std::env::var("CI").as_deref() != Ok("true"),
            "{msg}"
        );
        report_skip(msg);
        return;
    }
    let dir = std::env::temp_dir().join(format!("tunfwd-setcap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).unwrap();
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(dir.clone());
    let bin = dir.join("tunfwd");
    std::fs::copy(tunfwd_bin(), &bin).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert!(run_ok(&[
        "setcap",
        "cap_net_admin+ep",
        bin.to_str().unwrap()
    ]));

    // Most distributions make /dev/net/tun 0666 (the capability, not the
    // file mode, is what guards it). Where it is 0600 (this CI's
    // container), tunfwd's own mount namespace gets a 0666 node for it.
    let node = dir.join("tun");
    assert!(run_ok(&[
        "mknod",
        "-m",
        "0666",
        node.to_str().unwrap(),
        "c",
        "10",
        "200"
    ]));

    for engine in engines("runs_without_root_via_file_capability") {
        let topo = Topology::new();
        let mut script = format!(
            "mount --bind {} /dev/net/tun && exec setpriv --reuid=65534 --regid=65534 --clear-groups {}",
            node.display(),
            bin.display()
        );
        for arg in tunnel_args(true, &["--engine", engine]) {
            script.push(' ');
            script.push_str(&arg);
        }
        let cmd = topo.a.command(&["unshare", "--mount", "sh", "-c", &script]);
        let mut a = Proc::spawn(cmd);
        a.wait_for_stderr("tunnel up");
        let _b = Proc::tunfwd(&topo.b, &tunnel_args(false, &["--engine", engine]));
        let status = std::fs::read_to_string(format!("/proc/{}/status", a.child.id())).unwrap();
        assert_eq!(status_field(&status, "Uid:"), "65534\t65534\t65534\t65534");
        // CAP_NET_ADMIN (bit 12) and nothing else.
        assert_eq!(status_field(&status, "CapEff:"), "0000000000001000");
        assert!(topo.a.ping(OVERLAY_B), "{engine}: {}", a.stderr());
        let dst: SocketAddr = format!("{OVERLAY_B}:7000").parse().unwrap();
        verified_tcp_transfer(&topo.a, &topo.b, dst, 16 << 20);
        assert!(a.terminate().success(), "{engine}: {}", a.stderr());
        assert!(!topo.a.has_link("tun0"));
    }
}

/// The kernel's count of TCP segments with a bad checksum in `ns`.
fn tcp_in_csum_errors(ns: &Netns) -> u64 {
    kernel_counter(ns, "/proc/net/snmp", "Tcp", "InCsumErrors")
}

/// An IPv4 TCP segment (ACK) of 1000 bytes from the overlay address of b to
/// a's port 7000 (where the transfers run), whose TCP checksum was valid
/// before one payload bit flipped in transit.
fn corrupted_segment(i: usize, rng: &mut Rng) -> Vec<u8> {
    let mut p = vec![0u8; 1040];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&1040u16.to_be_bytes());
    p[6] = 0x40;
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&[198, 19, 0, 2]);
    p[16..20].copy_from_slice(&[198, 19, 0, 1]);
    let c = inet_checksum(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p[20..22].copy_from_slice(&(40000 + (i % 1000) as u16).to_be_bytes());
    p[22..24].copy_from_slice(&7000u16.to_be_bytes());
    p[24..28].copy_from_slice(&(rng.next() as u32).to_be_bytes());
    p[28..32].copy_from_slice(&(rng.next() as u32).to_be_bytes());
    p[32] = 5 << 4;
    p[33] = 0x10;
    p[34..36].copy_from_slice(&1024u16.to_be_bytes());
    for b in &mut p[40..] {
        *b = rng.next() as u8;
    }
    let mut pseudo = p[12..20].to_vec();
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&1020u16.to_be_bytes());
    pseudo.extend_from_slice(&p[20..]);
    let c = inet_checksum(&pseudo);
    p[36..38].copy_from_slice(&c.to_be_bytes());
    p[40 + i % 1000] ^= 0x10;
    p
}

/// TCP segments with corrupted payloads, sent from the peer's own address
/// and port into running transfers (offload on, so the receiver coalesces
/// TCP segments into super-packets that the kernel takes as verified):
/// every one is dropped as bad_checksum before it could be merged, none
/// reaches the kernel's TCP (its checksum-error counter stays put), and
/// every transfer's data arrives intact. The receiver runs without queue
/// management, so no CoDel drop can stand in for an injected segment: each
/// one is counted as bad_checksum, exactly, unless the kernel dropped
/// datagrams at the receive buffer (counted there, not per datagram).
#[test]
fn corrupted_tcp_segments_are_counted_and_never_delivered() {
    if !can_run_kernel_tests("corrupted_tcp_segments_are_counted_and_never_delivered") {
        return;
    }
    const COUNT: usize = 5_000;
    let peer: SocketAddr = format!("{UNDERLAY_B}:{PORT}").parse().unwrap();
    let target: SocketAddr = format!("{UNDERLAY_A}:{PORT}").parse().unwrap();
    for engine in engines("corrupted_tcp_segments_are_counted_and_never_delivered") {
        let topo = Topology::new();
        let extra = ["--engine", engine, "--rcvbuf", "8388608"];
        let mut a = Proc::tunfwd(
            &topo.a,
            &tunnel_args(true, &[&extra[..], &["--aqm", "off"]].concat()),
        );
        let mut b = Proc::tunfwd(&topo.b, &tunnel_args(false, &extra));
        assert!(
            a.stderr().contains("offload: TSO on"),
            "{engine}: the coalescing path must be on: {}",
            a.stderr()
        );
        let dst: SocketAddr = format!("{OVERLAY_A}:7000").parse().unwrap();
        verified_tcp_transfer(&topo.b, &topo.a, dst, 8 << 20);
        let csum_before = tcp_in_csum_errors(&topo.a);

        let stop = Arc::new(AtomicBool::new(false));
        let injector = topo.b.spawn(move || {
            let mut raw = RawUdp::new(peer, target);
            let mut rng = Rng(0xc0ffee);
            paced(COUNT, 10_000, |i| raw.send(&corrupted_segment(i, &mut rng)));
        });
        let transfers = {
            let stop2 = stop.clone();
            let (from, to) = (&topo.b, &topo.a);
            std::thread::scope(|sc| {
                let h = sc.spawn(|| transfers_until(from, to, dst, &stop2));
                injector.join().unwrap();
                stop.store(true, Ordering::Relaxed);
                h.join().unwrap()
            })
        };
        // The last injected datagrams are counted by the time a ping has
        // crossed the same path after them.
        assert!(topo.b.ping(OVERLAY_A), "{engine}: ping after the injection");
        let csum_after = tcp_in_csum_errors(&topo.a);
        assert!(a.terminate().success());
        assert!(b.terminate().success());
        let out = a.stdout();
        eprintln!("{engine}: {transfers} verified 8 MiB transfers during the injection\n{out}");
        let bad = direction_stat(&out, "summary total", "peer_to_tun", "bad_checksum");
        let kernel_drops = stat(&out, "summary kernel", "udp_rcvbuf_drops");
        assert_eq!(
            stat(&out, "summary total", "aqm_drops"),
            0,
            "{engine}: {out}"
        );
        if kernel_drops == 0 {
            assert_eq!(bad, COUNT as u64, "{engine}: injected {COUNT}\n{out}");
        } else {
            assert!(
                bad <= COUNT as u64 && bad + kernel_drops >= COUNT as u64,
                "{engine}: bad_checksum={bad}, kernel drops {kernel_drops}, injected {COUNT}\n{out}"
            );
        }
        assert_eq!(
            csum_before, csum_after,
            "{engine}: corrupted segments reached the kernel's TCP"
        );
    }
}
