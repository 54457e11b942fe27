//! WireGuard mode against the real kernel: keys interchangeable with `wg`,
//! tunfwd against Debian's wireguard-go (each side initiating, ping IPv4
//! and IPv6, verified TCP both ways) under both engines, and tunfwd against
//! tunfwd. Need root, wireguard-go and wireguard-tools; under CI=true they
//! fail instead of skipping.

#![cfg(all(target_os = "linux", feature = "wireguard"))]

mod common;

use std::io::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::fs::OpenOptionsExt as _;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;

const WG_TOOLS: &[(&str, &str)] = &[("wg", "wireguard-tools"), ("wireguard-go", "wireguard-go")];
const WG_PORT: u16 = 51820;

/// `tunfwd ARGS` with `input` on standard input; its standard output.
fn tunfwd_stdio(args: &[&str], input: &str) -> String {
    pipe(tunfwd_bin(), args, input)
}

fn pipe(prog: &str, args: &[&str], input: &str) -> String {
    let mut child = Command::new(prog)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {prog}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn keys_are_interchangeable_with_wg() {
    if !have_tools(
        "keys_are_interchangeable_with_wg",
        &[("wg", "wireguard-tools")],
    ) {
        return;
    }
    for _ in 0..4 {
        // tunfwd's private key, wg's public key of it, and the other way.
        let ours = tunfwd_stdio(&["genkey"], "");
        assert_eq!(ours.trim().len(), 44, "{ours}");
        assert_eq!(
            pipe("wg", &["pubkey"], &ours),
            tunfwd_stdio(&["pubkey"], &ours)
        );
        let theirs = pipe("wg", &["genkey"], "");
        assert_eq!(
            tunfwd_stdio(&["pubkey"], &theirs),
            pipe("wg", &["pubkey"], &theirs)
        );
    }
    // Not a key: refused, and the text is not repeated.
    let out = Command::new(tunfwd_bin())
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(b"not-a-key-at-all")?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is not a key") && !err.contains("not-a-key-at-all"),
        "{err}"
    );
}

/// A private key and its public key, made with tunfwd.
fn keypair() -> (String, String) {
    let private = tunfwd_stdio(&["genkey"], "").trim().to_string();
    let public = tunfwd_stdio(&["pubkey"], &private).trim().to_string();
    (private, public)
}

/// Writes `text` to a new file only its owner may read.
fn private_file(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&path)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
    path
}

/// A scratch directory, removed on drop.
struct Dir(std::path::PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "tunfwd-wg-{}-{}-{tag}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A wg setconf file: our key, our port, one peer.
fn wg_conf(private: &str, peer_public: &str, endpoint: Option<&str>, allowed: &str) -> String {
    let s = format!(
        "[Interface]\nPrivateKey = {private}\nListenPort = {WG_PORT}\n\n[Peer]\nPublicKey = {peer_public}\nAllowedIPs = {allowed}\n"
    );
    match endpoint {
        Some(e) => s + &format!("Endpoint = {e}\n"),
        None => s,
    }
}

/// wireguard-go running an interface of a unique name in `ns`, configured
/// with `wg setconf` and addressed; stopped on drop (its UAPI socket lives
/// in /var/run/wireguard, shared by all namespaces, hence the name).
struct WireguardGo {
    proc: Proc,
    name: String,
}

impl WireguardGo {
    fn start(ns: &Netns, conf: &std::path::Path, addrs: &[&str]) -> WireguardGo {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "wgt{}x{}",
            std::process::id() % 100_000,
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let mut cmd = ns.command(&["wireguard-go", "-f", &name]);
        cmd.env("WG_PROCESS_FOREGROUND", "1");
        let mut proc = Proc::spawn(cmd);
        // Ready when its UAPI socket answers.
        proc.wait_until("wireguard-go's UAPI socket", |_| {
            run_ok(&["ip", "netns", "exec", &ns.name, "wg", "show", &name]).then_some(())
        });
        let conf = conf.to_str().unwrap();
        run(&[
            "ip", "netns", "exec", &ns.name, "wg", "setconf", &name, conf,
        ]);
        for a in addrs {
            ns.ip(&["addr", "add", a, "dev", &name, "nodad"]);
        }
        ns.ip(&["link", "set", &name, "up"]);
        WireguardGo { proc, name }
    }

    /// `wg show NAME ARG` in `ns`.
    fn show(&self, ns: &Netns, what: &str) -> String {
        let out = run(&[
            "ip", "netns", "exec", &ns.name, "wg", "show", &self.name, what,
        ]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for WireguardGo {
    fn drop(&mut self) {
        let _ = self.proc.child.kill();
        let _ = self.proc.child.wait();
        let _ = std::fs::remove_file(format!("/var/run/wireguard/{}.sock", self.name));
    }
}

/// The two sides' files: a reaches b at its address; b reaches a only if
/// `b_knows_a` (else once a has made contact).
struct Confs {
    a: std::path::PathBuf,
    b: std::path::PathBuf,
    a_private: String,
    a_public: String,
    b_public: String,
}

impl Confs {
    fn write(dir: &Dir, b_knows_a: bool) -> Confs {
        let (a_private, a_public) = keypair();
        let (b_private, b_public) = keypair();
        let a_at = format!("{UNDERLAY_A}:{WG_PORT}");
        let b_at = format!("{UNDERLAY_B}:{WG_PORT}");
        let a = wg_conf(
            &a_private,
            &b_public,
            Some(&b_at),
            &format!("{OVERLAY_B}/32, {OVERLAY6_B}/128"),
        );
        let b = wg_conf(
            &b_private,
            &a_public,
            b_knows_a.then_some(a_at.as_str()),
            &format!("{OVERLAY_A}/32, {OVERLAY6_A}/128"),
        );
        Confs {
            a: private_file(&dir.0, "a.conf", &a),
            b: private_file(&dir.0, "b.conf", &b),
            a_private,
            a_public,
            b_public,
        }
    }
}

/// `tunfwd tunnel` in WireGuard mode with `conf`, as side a or b of the
/// topology (its overlay addresses on tun0).
fn wg_args(engine: &str, side_a: bool, conf: &std::path::Path) -> Vec<String> {
    if side_a {
        wg_args_at(engine, OVERLAY_A, OVERLAY6_A, conf)
    } else {
        wg_args_at(engine, OVERLAY_B, OVERLAY6_B, conf)
    }
}

/// The same with the device's addresses `o4`/24 and `o6`/64.
fn wg_args_at(engine: &str, o4: &str, o6: &str, conf: &std::path::Path) -> Vec<String> {
    [
        "tunnel",
        "--engine",
        engine,
        "--dev",
        "tun0",
        "--address",
        &format!("{o4}/24"),
        "--address",
        &format!("{o6}/64"),
        "--wg-config",
        conf.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec()
}

/// tunfwd (with `extra` lines in its file's [Peer]) in namespace a,
/// wireguard-go in b; b knows a's endpoint only if `b_knows_a`.
struct GoPair {
    topo: Topology,
    _dir: Dir,
    a: Proc,
    wg: WireguardGo,
    a_private: String,
    a_public: String,
}

impl GoPair {
    fn start(engine: &str, b_knows_a: bool, extra: &str) -> GoPair {
        let topo = Topology::new();
        let dir = Dir::new("go");
        let c = Confs::write(&dir, b_knows_a);
        if !extra.is_empty() {
            let text = std::fs::read_to_string(&c.a).unwrap() + extra;
            std::fs::write(&c.a, text).unwrap();
        }
        let wg = WireguardGo::start(
            &topo.b,
            &c.b,
            &[&format!("{OVERLAY_B}/24"), &format!("{OVERLAY6_B}/64")],
        );
        let mut a = Proc::tunfwd(&topo.a, &wg_args(engine, true, &c.a));
        a.wait_for_stderr("wireguard udp [::]:51820");
        GoPair {
            topo,
            _dir: dir,
            a,
            wg,
            a_private: c.a_private,
            a_public: c.a_public,
        }
    }
}

/// tunfwd in namespace a, wireguard-go in b; `tunfwd_first`: tunfwd sends
/// first (it initiates the handshake), else wireguard-go does.
fn interop(engine: &str, tunfwd_first: bool) {
    let what = format!(
        "{engine}, {} initiates",
        if tunfwd_first {
            "tunfwd"
        } else {
            "wireguard-go"
        }
    );
    // wireguard-go learns tunfwd's endpoint from its handshake, unless it
    // is the one to initiate.
    let GoPair {
        topo,
        _dir,
        mut a,
        wg,
        a_private: a_priv,
        a_public: a_pub,
    } = GoPair::start(engine, !tunfwd_first, "");
    let (first, second, to_second) = if tunfwd_first {
        (&topo.a, &topo.b, OVERLAY_B)
    } else {
        (&topo.b, &topo.a, OVERLAY_A)
    };
    assert!(
        first.ping(to_second),
        "{what}: ping over the first handshake"
    );
    let to_first = if tunfwd_first { OVERLAY_A } else { OVERLAY_B };
    assert!(second.ping(to_first), "{what}: ping back");
    assert!(topo.a.ping(OVERLAY6_B), "{what}: ping IPv6 a->b");
    assert!(topo.b.ping(OVERLAY6_A), "{what}: ping IPv6 b->a");
    let dst: SocketAddr = format!("{OVERLAY_B}:7000").parse().unwrap();
    verified_tcp_transfer(&topo.a, &topo.b, dst, 16 << 20);
    let back: SocketAddr = format!("[{OVERLAY6_A}]:7001").parse().unwrap();
    verified_tcp_transfer(&topo.b, &topo.a, back, 8 << 20);
    // wireguard-go saw a handshake with tunfwd's key, at tunfwd's address.
    let handshakes = wg.show(&topo.b, "latest-handshakes");
    assert!(handshakes.contains(&a_pub), "{what}: {handshakes}");
    let endpoints = wg.show(&topo.b, "endpoints");
    assert!(
        endpoints.contains(&format!("{UNDERLAY_A}:{WG_PORT}")),
        "{what}: {endpoints}"
    );
    assert!(a.terminate().success(), "{what}: {}", a.stderr());
    let out = a.stdout();
    // Nothing was dropped for a WireGuard reason, and no key was printed.
    for reason in [
        "wg_bad_auth",
        "wg_replay",
        "wg_unknown_index",
        "wg_bad_message",
    ] {
        assert_eq!(
            stat(&out, "summary total", reason),
            0,
            "{what}: {reason}\n{out}"
        );
    }
    // Both directions' bytes: the 24 MiB of the two transfers at least.
    assert!(
        stat_sum(&out, "summary total", "bytes") > 24 << 20,
        "{what}\n{out}"
    );
    for text in [out, a.stderr()] {
        assert!(
            !text.contains(&a_priv[..20]),
            "{what}: the private key was printed"
        );
    }
}

#[test]
fn interop_with_wireguard_go() {
    if !can_run_kernel_tests("interop_with_wireguard_go")
        || !have_tools("interop_with_wireguard_go", WG_TOOLS)
    {
        return;
    }
    for engine in engines("interop_with_wireguard_go") {
        for tunfwd_first in [true, false] {
            interop(engine, tunfwd_first);
        }
    }
}

#[test]
fn tunfwd_to_tunfwd_and_a_readable_key_file_is_refused() {
    if !can_run_kernel_tests("tunfwd_to_tunfwd") {
        return;
    }
    let dir = Dir::new("pair");
    let Confs {
        a: a_conf,
        b: b_conf,
        ..
    } = Confs::write(&dir, false);
    for engine in engines("tunfwd_to_tunfwd") {
        // None: the default, one queue per CPU this process may use but no
        // more than peers: one here.
        for (offload, queues) in [("on", None), ("off", Some("1")), ("on", Some("2"))] {
            let count = queues.unwrap_or("1");
            let what = format!("{engine}, offload {offload}, {queues:?} queues");
            let topo = Topology::new();
            let with = |side_a: bool, conf: &std::path::Path| {
                let mut v = wg_args(engine, side_a, conf);
                v.extend(["--offload", offload].map(String::from));
                if let Some(q) = queues {
                    v.extend(["--queues", q].map(String::from));
                }
                v
            };
            let mut b = Proc::tunfwd(&topo.b, &with(false, &b_conf));
            let mut a = Proc::tunfwd(&topo.a, &with(true, &a_conf));
            // Every queue binds the one port the peer knows.
            assert!(
                a.stderr().contains(&format!(
                    "{count} queue(s), engine {engine}, wireguard udp [::]:{WG_PORT}"
                )),
                "{what}: {}",
                a.stderr()
            );
            assert_eq!(
                worker_threads(a.child.id()),
                count.parse::<usize>().unwrap(),
                "{what}"
            );
            if queues == Some("2") {
                // The port is taken: another tunnel may not join its
                // SO_REUSEPORT group and take a share of a's datagrams.
                let out = topo
                    .a
                    .command(&[tunfwd_bin()])
                    .args(wg_args_dev(engine, true, &a_conf, "tun1"))
                    .output()
                    .unwrap();
                let err = String::from_utf8_lossy(&out.stderr);
                assert!(
                    !out.status.success() && err.contains("another process uses this port"),
                    "{what}: {err}"
                );
            }
            assert!(topo.a.ping(OVERLAY_B), "{what}: ping a->b");
            assert!(topo.b.ping(OVERLAY6_A), "{what}: ping b->a v6");
            // Two flows at once (with two queues, the device may hand
            // them to different workers, sealing for the same peer).
            let back = {
                let (from, to) = (Netns::existing(&topo.b.name), Netns::existing(&topo.a.name));
                let dst: SocketAddr = format!("{OVERLAY_A}:7001").parse().unwrap();
                std::thread::spawn(move || verified_tcp_transfer(&from, &to, dst, 8 << 20))
            };
            let dst: SocketAddr = format!("{OVERLAY_B}:7000").parse().unwrap();
            verified_tcp_transfer(&topo.a, &topo.b, dst, 16 << 20);
            back.join().expect("the transfer back");
            assert!(a.terminate().success());
            assert!(b.terminate().success());
            let (out_a, out_b) = (a.stdout(), b.stdout());
            assert!(
                stat(&out_b, "summary total", "wg_handshake_messages") >= 1,
                "{what}: {out_b}"
            );
            // With offload, a's super-packets left as sealed GSO sends and
            // b wrote coalesced segments; without it, neither.
            let (gso, vnet) = (
                stat(&out_a, "summary total", "gso_sends"),
                stat(&out_b, "summary total", "vnet_writes"),
            );
            if offload == "on" {
                assert!(
                    gso > 0 && vnet > 0,
                    "{what}: gso {gso}, vnet {vnet}\n{out_a}"
                );
            } else {
                assert_eq!((gso, vnet), (0, 0), "{what}");
            }
        }
    }
    // Group-readable: refused, naming the file and the fix.
    std::fs::set_permissions(&a_conf, std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
    let topo = Topology::new();
    let out = topo
        .a
        .command(&[tunfwd_bin()])
        .args(wg_args("poll", true, &a_conf))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("(mode 640)") && err.contains("chmod 600"),
        "{err}"
    );
    assert!(!topo.a.has_link("tun0"), "nothing was created");
}

/// The UDP payloads of WireGuard data messages (not keepalives) that
/// arrive at `dst` on any interface of `ns`, captured with a packet socket
/// until `want` are seen (or 20 s, a hang guard).
fn capture_data_messages(ns: &Netns, dst: SocketAddr, want: usize) -> Vec<Vec<u8>> {
    capture(ns, dst, want, |m| m.len() > 32 && m[0] == 4)
}

/// The UDP payloads to `dst` that `keep` accepts, seen on any interface of
/// `ns` with a packet socket, until `want` are seen (20 s hang guard).
fn capture(ns: &Netns, dst: SocketAddr, want: usize, keep: fn(&[u8]) -> bool) -> Vec<Vec<u8>> {
    use nix::sys::socket::{
        AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, recv, setsockopt, socket,
        sockopt,
    };
    use std::os::fd::AsRawFd;
    let SocketAddr::V4(dst) = dst else {
        panic!("IPv4 only")
    };
    ns.spawn(move || {
        let fd = socket(
            AddressFamily::Packet,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::EthAll,
        )
        .expect("packet socket");
        setsockopt(
            &fd,
            sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(0, 200_000),
        )
        .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut out = Vec::new();
        let mut frame = vec![0u8; 65536];
        while out.len() < want {
            assert!(
                std::time::Instant::now() < deadline,
                "captured only {}",
                out.len()
            );
            let Ok(n) = recv(fd.as_raw_fd(), &mut frame, MsgFlags::empty()) else {
                continue;
            };
            let f = &frame[..n];
            // Ethernet, IPv4, UDP to dst, a data message with a packet in it.
            if n < 14 + 20 + 8 || f[12..14] != [0x08, 0x00] || f[14 + 9] != 17 {
                continue;
            }
            let ihl = usize::from(f[14] & 15) * 4;
            let udp = &f[14 + ihl..];
            let to_dst =
                f[14 + 16..14 + 20] == dst.ip().octets() && udp[2..4] == dst.port().to_be_bytes();
            let payload = &udp[8..];
            if to_dst && keep(payload) {
                out.push(payload.to_vec());
            }
        }
        out
    })
    .join()
    .unwrap()
}

/// A handshake initiation to `responder` from a key it does not know, as a
/// real WireGuard implementation makes it (a valid mac1: the responder's
/// public key is public).
fn stranger_initiation(responder: &str, seed: u64) -> Vec<u8> {
    use boringtun::noise::{Tunn, TunnResult};
    let mut key = [0u8; 32];
    DataStream::new(seed).fill(&mut key);
    let mut public = [0u8; 32];
    base64::Engine::decode_slice(
        &base64::engine::general_purpose::STANDARD,
        responder,
        &mut public,
    )
    .unwrap();
    let mut t = Tunn::new(
        boringtun::x25519::StaticSecret::from(key),
        boringtun::x25519::PublicKey::from(public),
        None,
        None,
        0,
        None,
    );
    let mut out = vec![0u8; 256];
    match t.format_handshake_initiation(&mut out, false) {
        TunnResult::WriteToNetwork(d) => d.to_vec(),
        other => panic!("no initiation: {other:?}"),
    }
}

/// Attacks on side b while verified transfers run from a to b; each must
/// be counted under its reason and reach nothing.
fn attacks(engine: &str) {
    let topo = Topology::new();
    let dir = Dir::new("attacks");
    let c = Confs::write(&dir, false);
    // b is attacked: its public key and port are what an attacker knows.
    let b_public = c.b_public.clone();
    let mut b = Proc::tunfwd(&topo.b, &wg_args(engine, false, &c.b));
    let mut a = Proc::tunfwd(&topo.a, &wg_args(engine, true, &c.a));
    // The flood comes from many addresses: b takes them (no reverse-path
    // filter) and can answer them (a route; the answers are lost on a).
    for knob in ["all", "veth0", "default"] {
        assert!(topo.b.run_ok(&[
            "sysctl",
            "-qw",
            &format!("net.ipv4.conf.{knob}.rp_filter=0")
        ]));
    }
    topo.b
        .ip(&["route", "add", "198.18.1.0/24", "dev", "veth0"]);
    // Anything that got through to this port would be counted here.
    let sink_addr: SocketAddr = format!("{OVERLAY_B}:9999").parse().unwrap();
    let sink_stop = Arc::new(AtomicBool::new(false));
    let sink = {
        let stop = sink_stop.clone();
        topo.b.spawn(move || {
            let s = UdpSocket::bind(sink_addr).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let mut got = 0;
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if s.recv(&mut buf).is_ok() {
                    got += 1;
                }
            }
            got
        })
    };
    let stop = Arc::new(AtomicBool::new(false));
    let transfers = {
        let (from, to, stop) = (
            Netns::existing(&topo.a.name),
            Netns::existing(&topo.b.name),
            stop.clone(),
        );
        let dst: SocketAddr = format!("{OVERLAY_B}:7000").parse().unwrap();
        std::thread::spawn(move || {
            let mut n = 0;
            while n == 0 || !stop.load(Ordering::Relaxed) {
                verified_tcp_transfer(&from, &to, dst, 8 << 20);
                n += 1;
            }
            n
        })
    };
    let target: SocketAddr = format!("{UNDERLAY_B}:{WG_PORT}").parse().unwrap();
    let captured = capture_data_messages(&topo.b, target, 300);
    let rss_before = rss_kib(b.child.id());
    // 1. Replays of captured messages, 2. the same with one ciphertext bit
    // flipped (at counters never used, so the tag is what fails), 3. an
    // unknown receiver index: from a's address, another port.
    let n = captured.len();
    let (replays, flips, unknown) = (n, n, n);
    let from_a = Netns::existing(&topo.a.name);
    let sent = {
        let captured = captured.clone();
        from_a
            .spawn(move || {
                let s = UdpSocket::bind(format!("{UNDERLAY_A}:0")).unwrap();
                paced(3 * n, 20_000, |i| {
                    let mut m = captured[i % n].clone();
                    match i / n {
                        0 => {}
                        1 => {
                            m[8..16].copy_from_slice(&((1u64 << 40) + i as u64).to_le_bytes());
                            m[20] ^= 0x10;
                        }
                        _ => m[4..8].copy_from_slice(&((77u32 << 8) | 1).to_le_bytes()),
                    }
                    s.send_to(&m, target).unwrap();
                });
                3 * n
            })
            .join()
            .unwrap()
    };
    assert_eq!(sent, replays + flips + unknown);
    // 4. Packets whose inner source is outside a's AllowedIPs, sent into
    // a's device: a seals them (a valid peer), b must refuse them.
    let spoofed = 1000;
    let spoof_src: SocketAddr = "198.19.7.7:4000".parse().unwrap();
    from_a
        .spawn(move || {
            let mut raw = RawUdp::new(spoof_src, sink_addr);
            paced(spoofed, 10_000, |_| raw.send(b"forged"))
        })
        .join()
        .unwrap();
    // 5. A flood of handshake initiations from 200 addresses and keys b
    // does not know, faster than b takes handshakes (100 a second).
    let flood = 2000;
    let inits: Vec<Vec<u8>> = (0..200)
        .map(|k| stranger_initiation(&b_public, k + 1))
        .collect();
    from_a
        .spawn(move || {
            let mut raw = RawUdp::new("198.18.1.1:40000".parse().unwrap(), target);
            paced(flood, 10_000, |i| {
                let src: SocketAddr = format!("198.18.1.{}:{}", 1 + i % 200, 40000 + i % 1000)
                    .parse()
                    .unwrap();
                raw.set_source(src);
                raw.send(&inits[i % 200]);
            })
        })
        .join()
        .unwrap();
    let rss_after = rss_kib(b.child.id());
    stop.store(true, Ordering::Relaxed);
    let done = transfers.join().expect("verified transfers");
    sink_stop.store(true, Ordering::Relaxed);
    let leaked = sink.join().unwrap();
    assert!(a.terminate().success());
    assert!(b.terminate().success(), "{}", b.stderr());
    let out = b.stdout();
    let rx = |k: &str| direction_stat(&out, "summary total", "peer_to_tun", k);
    let lost = stat(&out, "summary kernel", "udp_rcvbuf_drops");
    // The spoofed packets cross a's device and a's forwarder first, both
    // busy with the transfers: its ring and its queues may drop some.
    let a_out = a.stdout();
    let a_lost = stat(&a_out, "summary kernel", "tun_queue_drops")
        + direction_stat(&a_out, "summary total", "tun_to_peer", "overload")
        + direction_stat(&a_out, "summary total", "tun_to_peer", "aqm");
    let what = format!(
        "{engine}: {done} transfers, {lost} lost at b's socket, {a_lost} dropped on a\n{out}"
    );
    // Each counted under its reason; the kernel's receive buffer is the
    // only place one may be lost instead (and a's side, for those that
    // cross it).
    for (reason, want, slack) in [
        ("wg_replay", replays, lost),
        ("wg_bad_auth", flips, lost),
        ("wg_unknown_index", unknown, lost),
        ("source_not_allowed", spoofed, lost + a_lost),
    ] {
        let got = rx(reason);
        assert!(
            got <= want as u64 && got + slack >= want as u64,
            "{reason}: {got} of {want}; {what}"
        );
    }
    let cookies = stat(&out, "summary total", "wg_cookie_replies");
    let refused = rx("not_from_peer") + rx("wg_handshake_backlog");
    assert!(cookies > 0, "the flood was answered with cookies; {what}");
    assert!(
        cookies + refused <= flood as u64 && cookies + refused + lost >= flood as u64,
        "flood: {cookies} cookies + {refused} refused of {flood}; {what}"
    );
    assert_eq!(leaked, 0, "{engine}: a forged packet reached b's device");
    assert!(
        rss_after < rss_before + 16 * 1024,
        "{engine}: RSS {rss_before} -> {rss_after} KiB"
    );
    eprintln!(
        "{engine}: replays {replays} -> {}, flips {flips} -> {}, unknown index {unknown} -> {}, \
         spoofed {spoofed} -> {} ({a_lost} dropped on a), flood {flood} -> {cookies} cookie \
         replies + {refused} refused, lost at b's socket {lost}, {done} verified transfers, \
         RSS {rss_before} -> {rss_after} KiB",
        rx("wg_replay"),
        rx("wg_bad_auth"),
        rx("wg_unknown_index"),
        rx("source_not_allowed")
    );
}

#[test]
fn attacks_during_a_transfer_are_counted_and_reach_nothing() {
    if !can_run_kernel_tests("wireguard attacks") {
        return;
    }
    for engine in engines("wireguard attacks") {
        attacks(engine);
    }
}

/// The veth address of namespace b after it moves.
const MOVED_B: &str = "198.18.0.6";

/// wireguard-go moves to a new address and port in the middle of a
/// transfer it sends to tunfwd: tunfwd follows its authenticated datagrams
/// (roaming), so its ACKs reach the new place (the old address is gone)
/// and the transfer completes.
fn roams(engine: &str) {
    let p = GoPair::start(engine, false, "");
    let topo = &p.topo;
    assert!(topo.a.ping(OVERLAY_B), "{engine}: ping before");
    let total = 24u64 << 20;
    let progress = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let transfer = {
        let (from, to, progress) = (
            Netns::existing(&topo.a.name),
            Netns::existing(&topo.b.name),
            progress.clone(),
        );
        let dst: SocketAddr = format!("{OVERLAY_A}:7000").parse().unwrap();
        std::thread::spawn(move || {
            verified_tcp_transfer_observed(&to, &from, dst, total, Some(progress), Some(4 << 20))
        })
    };
    // A quarter in: b takes a new address and port, and drops the old.
    let mut a = p.a;
    a.wait_until("a quarter of the transfer", |_| {
        (progress.load(Ordering::Relaxed) >= total / 4).then_some(())
    });
    topo.a
        .ip(&["route", "add", "198.18.0.4/30", "dev", "veth0"]);
    topo.b
        .ip(&["addr", "add", &format!("{MOVED_B}/30"), "dev", "veth0"]);
    topo.b.ip(&["addr", "del", "198.18.0.2/30", "dev", "veth0"]);
    topo.b
        .ip(&["route", "add", "198.18.0.0/30", "dev", "veth0"]);
    let ns = &topo.b.name;
    run(&[
        "ip",
        "netns",
        "exec",
        ns,
        "wg",
        "set",
        &p.wg.name,
        "listen-port",
        "51821",
    ]);
    let moved_at = progress.load(Ordering::Relaxed);
    assert_eq!(transfer.join().expect("the transfer"), total);
    assert!(
        moved_at < total,
        "{engine}: the move met a running transfer"
    );
    // And the tunnel works from the new place.
    assert!(topo.a.ping(OVERLAY_B), "{engine}: ping after the move");
    let endpoints = p.wg.show(&topo.b, "endpoints");
    assert!(
        endpoints.contains(&format!("{UNDERLAY_A}:{WG_PORT}")),
        "{endpoints}"
    );
    assert!(a.terminate().success(), "{engine}: {}", a.stderr());
    let out = a.stdout();
    assert_eq!(stat(&out, "summary total", "wg_bad_auth"), 0, "{out}");
    // tunfwd followed the data: the one handshake message it took is the
    // first response (a peer left without answers would have initiated
    // again from its new place after 15 s).
    assert_eq!(
        stat(&out, "summary total", "wg_handshake_messages"),
        1,
        "{engine}: roamed by a new handshake, not by the data\n{out}"
    );
    eprintln!("{engine}: wireguard-go moved at {moved_at} of {total} bytes; the transfer went on");
}

#[test]
fn interop_peer_roams_mid_transfer() {
    if !can_run_kernel_tests("interop_peer_roams_mid_transfer")
        || !have_tools("interop_peer_roams_mid_transfer", WG_TOOLS)
    {
        return;
    }
    for engine in engines("interop_peer_roams_mid_transfer") {
        roams(engine);
    }
}

#[test]
fn interop_persistent_keepalives_are_seen_on_the_wire() {
    let test = "interop_persistent_keepalives";
    if !can_run_kernel_tests(test) || !have_tools(test, WG_TOOLS) {
        return;
    }
    for engine in engines(test) {
        let p = GoPair::start(engine, false, "PersistentKeepalive = 1\n");
        // One ping makes the session; then the link is idle, and tunfwd's
        // keepalives (data messages of no packet: 32 bytes) cross it.
        assert!(p.topo.a.ping(OVERLAY_B), "{engine}: ping");
        let target: SocketAddr = format!("{UNDERLAY_B}:{WG_PORT}").parse().unwrap();
        let seen = capture(&p.topo.b, target, 3, |m| m.len() == 32 && m[0] == 4);
        assert_eq!(seen.len(), 3, "{engine}");
        eprintln!("{engine}: 3 keepalives of 32 bytes seen on b's veth");
    }
}

/// The latest handshake wireguard-go had with a (Unix seconds; 0: none).
fn latest_handshake(p: &GoPair) -> u64 {
    p.wg.show(&p.topo.b, "latest-handshakes")
        .lines()
        .find(|l| l.contains(&p.a_public))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// A transfer that runs past REKEY_AFTER_TIME (120 s): a new handshake
/// happens under it, and it completes byte for byte.
fn rekeys(engine: &str) {
    let p = GoPair::start(engine, false, "");
    assert!(p.topo.a.ping(OVERLAY_B), "{engine}: ping");
    let first = latest_handshake(&p);
    assert!(first > 0, "{engine}: a first handshake");
    let dst: SocketAddr = format!("{OVERLAY_B}:7000").parse().unwrap();
    // 130 s at 512 KiB/s.
    let total = 130 * (512 << 10);
    let got =
        verified_tcp_transfer_observed(&p.topo.a, &p.topo.b, dst, total, None, Some(512 << 10));
    assert_eq!(got, total);
    let second = latest_handshake(&p);
    assert!(
        second >= first + 110,
        "{engine}: a new handshake under the transfer ({first} -> {second})"
    );
    eprintln!("{engine}: handshakes at {first} and {second}; 65 MiB verified across the rekey");
}

#[test]
fn interop_a_session_lives_through_a_rekey() {
    let test = "interop_a_session_lives_through_a_rekey";
    if !can_run_kernel_tests(test) || !have_tools(test, WG_TOOLS) {
        return;
    }
    // Both engines at once: each waits for REKEY_AFTER_TIME.
    let runs: Vec<_> = engines(test)
        .into_iter()
        .map(|e| std::thread::spawn(move || rekeys(e)))
        .collect();
    for r in runs {
        r.join().expect("a rekey run");
    }
}

/// A WireGuard hub and three spokes (tests/hub.rs's topology): each spoke's
/// file names the hub, owning the whole overlay; the hub's names each
/// spoke, owning its addresses. Spoke to hub and spoke to spoke through the
/// hub (its kernel routes them back into its device), over IPv4 and IPv6,
/// and a verified transfer between two spokes, per engine.
fn wg_hub(engine: &str) {
    let dir = Dir::new("hub");
    let hub_ns = hub_namespace();
    let spokes: Vec<Spoke> = (1..=3).map(|k| spoke(&hub_ns, k)).collect();
    let (hub_private, hub_public) = keypair();
    let keys: Vec<(String, String)> = spokes.iter().map(|_| keypair()).collect();
    let mut hub_conf = format!("[Interface]\nPrivateKey = {hub_private}\nListenPort = {WG_PORT}\n");
    for (s, (_, public)) in spokes.iter().zip(&keys) {
        hub_conf.push_str(&format!(
            "\n[Peer]\nPublicKey = {public}\nAllowedIPs = {}/32, {}/128\n",
            s.inner4(),
            s.inner6()
        ));
    }
    let hub_file = private_file(&dir.0, "hub.conf", &hub_conf);
    let mut hub = Proc::tunfwd(
        &hub_ns,
        &wg_args_at(engine, "198.19.0.1", "2001:db8:19::1", &hub_file),
    );
    let mut running = Vec::new();
    for (s, (private, _)) in spokes.iter().zip(&keys) {
        let text = format!(
            "[Interface]\nPrivateKey = {private}\nListenPort = {WG_PORT}\n\n[Peer]\nPublicKey = {hub_public}\n\
             Endpoint = {HUB_UNDERLAY}:{WG_PORT}\nAllowedIPs = 198.19.0.0/24, 2001:db8:19::/64\n"
        );
        let file = private_file(&dir.0, &format!("spoke{}.conf", s.k), &text);
        running.push(Proc::tunfwd(
            &s.ns,
            &wg_args_at(engine, &s.inner4(), &s.inner6(), &file),
        ));
    }
    // The default queues: one per CPU, but no more than peers (the hub has
    // three, a spoke one).
    assert_eq!(
        worker_threads(hub.child.id()),
        usable_cpus().min(3),
        "{engine}: the hub's workers"
    );
    for s in &running {
        assert_eq!(worker_threads(s.child.id()), 1, "{engine}: a spoke's");
    }
    let (s1, s2, s3) = (&spokes[0], &spokes[1], &spokes[2]);
    assert!(s1.ns.ping("198.19.0.1"), "{engine}: spoke 1 -> hub");
    assert!(s2.ns.ping("198.19.0.1"), "{engine}: spoke 2 -> hub");
    assert!(
        s3.ns.ping("2001:db8:19::1"),
        "{engine}: spoke 3 -> hub over IPv6"
    );
    assert!(
        s1.ns.ping(&s2.inner4()),
        "{engine}: spoke 1 -> spoke 2 through the hub"
    );
    assert!(
        s3.ns.ping(&s1.inner6()),
        "{engine}: spoke 3 -> spoke 1 over IPv6"
    );
    let dst: SocketAddr = format!("{}:7000", s2.inner4()).parse().unwrap();
    verified_tcp_transfer(&s1.ns, &s2.ns, dst, 8 << 20);
    // The hub's stats name each spoke by its key (no endpoint was given).
    assert!(hub.terminate().success());
    let out = hub.stdout();
    for (_, public) in &keys {
        assert!(
            out.contains(&format!("summary peer={public} ")),
            "{engine}: {public}\n{out}"
        );
    }
}

#[test]
fn a_hub_with_three_spokes() {
    if !can_run_kernel_tests("wireguard hub") {
        return;
    }
    for engine in engines("wireguard hub") {
        wg_hub(engine);
    }
}

/// A UDP relay in `ns` between tunfwd a and tunfwd b that plays a
/// congested router: every datagram from a leaves for b marked CE (its
/// outer TOS byte is `mark`), and the outer TOS byte and length of each
/// datagram from a are kept, in order. b sees the relay's second socket as
/// a's endpoint (roaming) and answers there; the relay passes that back.
struct Relay {
    stop: Arc<AtomicBool>,
    seen: Arc<std::sync::Mutex<Vec<(u8, usize)>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Relay {
    fn start(ns: &Netns, listen: SocketAddr, to: SocketAddr, mark: u8) -> Relay {
        use nix::sys::socket::{setsockopt, sockopt};
        let (from_a, to_b) = ns
            .spawn(move || {
                let s1 = UdpSocket::bind(listen).expect("bind the relay");
                let s2 = UdpSocket::bind((listen.ip(), 0)).expect("bind the relay's far side");
                (s1, s2)
            })
            .join()
            .unwrap();
        setsockopt(&from_a, sockopt::IpRecvTos, &true).unwrap();
        setsockopt(&to_b, sockopt::Ipv4Tos, &i32::from(mark)).unwrap();
        to_b.connect(to).unwrap();
        for s in [&from_a, &to_b] {
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
        }
        let (from_a, to_b) = (Arc::new(from_a), Arc::new(to_b));
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let a_at = Arc::new(std::sync::Mutex::new(None::<SocketAddr>));
        let forward = {
            let (from_a, to_b, stop, seen, a_at) = (
                from_a.clone(),
                to_b.clone(),
                stop.clone(),
                seen.clone(),
                a_at.clone(),
            );
            std::thread::spawn(move || {
                use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrIn, recvmsg};
                use std::os::fd::AsRawFd;
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let mut space = nix::cmsg_space!(u8);
                    let (n, tos, from) = {
                        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
                        let Ok(m) = recvmsg::<SockaddrIn>(
                            from_a.as_raw_fd(),
                            &mut iov,
                            Some(&mut space),
                            MsgFlags::empty(),
                        ) else {
                            continue;
                        };
                        let tos = m.cmsgs().unwrap().find_map(|c| match c {
                            ControlMessageOwned::Ipv4Tos(t) => Some(t),
                            _ => None,
                        });
                        let from = m.address.map(|a| SocketAddr::from((a.ip(), a.port())));
                        (m.bytes, tos.expect("IP_TOS with every datagram"), from)
                    };
                    *a_at.lock().unwrap() = from;
                    seen.lock().unwrap().push((tos, n));
                    let _ = to_b.send(&buf[..n]);
                }
            })
        };
        let back = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let Ok(n) = to_b.recv(&mut buf) else { continue };
                    if let Some(a) = *a_at.lock().unwrap() {
                        let _ = from_a.send_to(&buf[..n], a);
                    }
                }
            })
        };
        Relay {
            stop,
            seen,
            threads: vec![forward, back],
        }
    }

    /// The (outer TOS byte, length) of the datagrams from a so far, and
    /// forgets them.
    fn take(&self) -> Vec<(u8, usize)> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Outer ECN as the kernel's WireGuard does it, both engines: a data
/// message carries its packet's ECN bits outside (CE as ECT(0), no DSCP),
/// and a CE mark on the underlay reaches ECN-capable packets and leaves
/// Not-ECT ones alone; counted as `wg_outer_ce`. One UDP datagram per
/// packet (the seal of one packet), then a TCP transfer with ECN on
/// (super-packets sealed segment by segment).
fn outer_ecn(engine: &str) {
    const RELAY: u16 = 51900;
    const N: usize = 20;
    const DSCP: u8 = 0xb8;
    let topo = Topology::new();
    let dir = Dir::new("ecn");
    let (a_private, a_public) = keypair();
    let (b_private, b_public) = keypair();
    let a_conf = private_file(
        &dir.0,
        "a.conf",
        &wg_conf(
            &a_private,
            &b_public,
            Some(&format!("{UNDERLAY_B}:{RELAY}")),
            &format!("{OVERLAY_B}/32"),
        ),
    );
    let b_conf = private_file(
        &dir.0,
        "b.conf",
        &wg_conf(&b_private, &a_public, None, &format!("{OVERLAY_A}/32")),
    );
    let relay = Relay::start(
        &topo.b,
        format!("{UNDERLAY_B}:{RELAY}").parse().unwrap(),
        format!("{UNDERLAY_B}:{WG_PORT}").parse().unwrap(),
        0b11,
    );
    let mut b = Proc::tunfwd(&topo.b, &wg_args(engine, false, &b_conf));
    b.wait_for_stderr("wireguard udp [::]:51820");
    let mut a = Proc::tunfwd(&topo.a, &wg_args(engine, true, &a_conf));
    assert!(topo.a.ping(OVERLAY_B), "{engine}: ping through the relay");

    // Datagrams of four kinds, N each, in order: ECT(0), ECT(1), CE,
    // Not-ECT, all with DSCP EF.
    let kinds = [0b10u8, 0b01, 0b11, 0b00];
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let receiver = topo.b.spawn(move || {
        use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrIn, recvmsg, setsockopt};
        use std::os::fd::AsRawFd;
        let s = UdpSocket::bind((OVERLAY_B, 7100)).unwrap();
        setsockopt(&s, nix::sys::socket::sockopt::IpRecvTos, &true).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        ready_tx.send(()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        while got.len() < 4 * N && std::time::Instant::now() < deadline {
            let mut space = nix::cmsg_space!(u8);
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            let Ok(m) =
                recvmsg::<SockaddrIn>(s.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::empty())
            else {
                continue;
            };
            let tos = m.cmsgs().unwrap().find_map(|c| match c {
                ControlMessageOwned::Ipv4Tos(t) => Some(t),
                _ => None,
            });
            got.push(tos.expect("IP_TOS with every datagram"));
        }
        got
    });
    ready_rx.recv().unwrap();
    relay.take();
    topo.a
        .spawn(move || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            for ecn in kinds {
                nix::sys::socket::setsockopt(
                    &s,
                    nix::sys::socket::sockopt::Ipv4Tos,
                    &i32::from(DSCP | ecn),
                )
                .unwrap();
                for _ in 0..N {
                    s.send_to(&[ecn; 100], (OVERLAY_B, 7100)).unwrap();
                }
            }
        })
        .join()
        .unwrap();
    let got = receiver.join().unwrap();
    // Inside: the CE mark reached the three ECN-capable kinds; Not-ECT
    // arrived as it left.
    let mut want = vec![DSCP | 0b11; 3 * N];
    want.extend(vec![DSCP; N]);
    assert_eq!(got, want, "{engine}: inner TOS bytes at b");
    // Outside: the data messages of those datagrams (20 + 8 + 100 bytes,
    // padded to 128, plus 32) carried their ECN bits, CE as ECT(0), no DSCP.
    let outer: Vec<u8> = relay
        .take()
        .into_iter()
        .filter(|&(_, len)| len == 160)
        .map(|(tos, _)| tos)
        .collect();
    let mut want = Vec::new();
    for o in [0b10u8, 0b01, 0b10, 0b00] {
        want.extend(vec![o; N]);
    }
    assert_eq!(outer, want, "{engine}: outer TOS bytes on the underlay");

    // TCP with ECN: its data segments leave as ECT(0) messages (and its
    // retransmissions, which RFC 3168 sends Not-ECT, as Not-ECT ones).
    topo.a
        .command(&["sysctl", "-qw", "net.ipv4.tcp_ecn=1"])
        .status()
        .unwrap();
    let dst: SocketAddr = format!("{OVERLAY_B}:7101").parse().unwrap();
    verified_tcp_transfer(&topo.a, &topo.b, dst, 2 << 20);
    let big: Vec<u8> = relay
        .take()
        .into_iter()
        .filter(|&(_, len)| len > 1000)
        .map(|(tos, _)| tos)
        .collect();
    let ect0 = big.iter().filter(|&&t| t == 0b10).count();
    assert!(ect0 > 100, "{engine}: {ect0} ECT(0) messages: {big:?}");
    assert!(
        big.iter().all(|&t| t == 0b10 || t == 0),
        "{engine}: TCP data messages neither ECT(0) nor Not-ECT: {big:?}"
    );
    assert!(a.terminate().success());
    assert!(b.terminate().success());
    let out_b = b.stdout();
    let ce = stat(&out_b, "summary total", "wg_outer_ce");
    assert!(
        ce >= (3 * N + ect0) as u64,
        "{engine}: wg_outer_ce {ce}, want at least {}\n{out_b}",
        3 * N + ect0
    );
}

#[test]
fn outer_ecn_bits_follow_the_kernels_wireguard() {
    if !can_run_kernel_tests("outer_ecn_bits_follow_the_kernels_wireguard") {
        return;
    }
    for engine in engines("outer_ecn_bits_follow_the_kernels_wireguard") {
        outer_ecn(engine);
    }
}

/// An interface name no other test uses (the API's sockets share one
/// directory for every namespace).
fn iface(tag: &str) -> String {
    format!("tw{}{tag}", std::process::id() % 100_000)
}

/// `wg ARGS` in `ns`; its standard output (success required).
fn wg(ns: &Netns, args: &[&str]) -> String {
    let out = ns.command(&["wg"]).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "wg {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `wg ARGS` in `ns`, which must fail; its standard error.
fn wg_fails(ns: &Netns, args: &[&str]) -> String {
    let out = ns.command(&["wg"]).args(args).output().unwrap();
    assert!(!out.status.success(), "wg {args:?} succeeded");
    String::from_utf8(out.stderr).unwrap()
}

/// `wg show IFACE dump`: the interface's fields, then each peer's, by
/// public key.
struct Dump {
    interface: Vec<String>,
    peers: std::collections::BTreeMap<String, Vec<String>>,
}

fn dump(ns: &Netns, dev: &str) -> Dump {
    let text = wg(ns, &["show", dev, "dump"]);
    let mut lines = text
        .lines()
        .map(|l| l.split('\t').map(String::from).collect::<Vec<_>>());
    let interface = lines.next().expect("the interface line");
    let peers = lines.map(|f| (f[0].clone(), f)).collect();
    Dump { interface, peers }
}

/// tunfwd in WireGuard mode as side a (`conf`) on device `dev`.
fn wg_args_dev(engine: &str, side_a: bool, conf: &std::path::Path, dev: &str) -> Vec<String> {
    wg_args(engine, side_a, conf)
        .into_iter()
        .map(|a| if a == "tun0" { dev.to_string() } else { a })
        .collect()
}

/// A key file for `wg set ... private-key`/`preshared-key`.
fn key_file(dir: &Dir, name: &str, key: &str) -> String {
    private_file(&dir.0, name, &format!("{key}\n"))
        .to_str()
        .unwrap()
        .to_string()
}

/// The sum of the samples of metric `name` with the label `peer="KEY"` and
/// `direction="DIR"` in a scrape.
fn peer_metric(body: &str, name: &str, peer: &str, dir: &str) -> u64 {
    body.lines()
        .filter(|l| {
            l.starts_with(name)
                && l.contains(&format!("peer=\"{peer}\""))
                && l.contains(&format!("direction=\"{dir}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// `GET /metrics` from `at` in `ns`: the body.
fn scrape(ns: &Netns, at: SocketAddr) -> String {
    use std::io::Read as _;
    ns.spawn(move || {
        let mut s = std::net::TcpStream::connect(at).expect("the metrics port");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text.split_once("\r\n\r\n")
            .map(|x| x.1.to_string())
            .unwrap_or_default()
    })
    .join()
    .unwrap()
}

/// Every `wg` command against tunfwd (wireguard-tools unmodified), each
/// result read back and compared with what was set; `wg show dump`
/// against `/metrics` after a verified transfer.
#[test]
fn wg_drives_tunfwd_through_the_userspace_api() {
    let test = "wg_drives_tunfwd_through_the_userspace_api";
    if !can_run_kernel_tests(test) || !have_tools(test, WG_TOOLS) {
        return;
    }
    let engine = engines("wg_drives_tunfwd_through_the_userspace_api")[0];
    let topo = Topology::new();
    let dir = Dir::new("uapi");
    let c = Confs::write(&dir, false);
    let (dev_a, dev_b) = (iface("a"), iface("b"));
    let metrics: SocketAddr = "127.0.0.1:9581".parse().unwrap();
    let mut args_a = wg_args_dev(engine, true, &c.a, &dev_a);
    args_a.extend(["--metrics", &metrics.to_string(), "--stats-format", "json"].map(String::from));
    let mut b = Proc::tunfwd(&topo.b, &wg_args_dev(engine, false, &c.b, &dev_b));
    let mut a = Proc::tunfwd(&topo.a, &args_a);
    let sock = format!("/var/run/wireguard/{dev_a}.sock");
    let mode = std::fs::metadata(&sock).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o7777,
        0o700,
        "{sock}"
    );
    assert!(a.stderr().contains(&format!("WireGuard API (wg): {sock}")));
    assert!(topo.a.ping(OVERLAY_B), "ping");

    // wg show: the interface and its peer, as set by the file.
    let show = wg(&topo.a, &["show", &dev_a]);
    for want in [
        format!("interface: {dev_a}"),
        format!("public key: {}", c.a_public),
        "listening port: 51820".into(),
        format!("peer: {}", c.b_public),
        format!("endpoint: {UNDERLAY_B}:{WG_PORT}"),
        format!("allowed ips: {OVERLAY_B}/32, {OVERLAY6_B}/128"),
        "latest handshake:".into(),
    ] {
        assert!(show.contains(&want), "{want:?} in\n{show}");
    }
    // wg showconf: the private key and the peer, as wg writes a file.
    let conf = wg(&topo.a, &["showconf", &dev_a]);
    assert!(
        conf.contains(&format!("PrivateKey = {}", c.a_private)),
        "{conf}"
    );
    assert!(
        conf.contains(&format!("PublicKey = {}", c.b_public)),
        "{conf}"
    );
    assert!(!a.stderr().contains(&c.a_private), "no key logged");

    // A verified transfer, then dump and /metrics agree on each byte.
    let dst: SocketAddr = format!("{OVERLAY_B}:7200").parse().unwrap();
    verified_tcp_transfer(&topo.a, &topo.b, dst, 4 << 20);
    let d = dump(&topo.a, &dev_a);
    assert_eq!(d.interface[1], c.a_public);
    assert_eq!(d.interface[2], "51820");
    assert_eq!(d.interface[3], "off");
    let p = &d.peers[&c.b_public];
    assert_eq!(p[2], format!("{UNDERLAY_B}:{WG_PORT}"));
    let handshake: u64 = p[4].parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        handshake > 0 && handshake <= now && now - handshake < 60,
        "{p:?}"
    );
    let (rx, tx): (u64, u64) = (p[5].parse().unwrap(), p[6].parse().unwrap());
    assert!(tx > 4 << 20, "{p:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let body = scrape(&topo.a, metrics);
        let d = dump(&topo.a, &dev_a);
        let p = &d.peers[&c.b_public];
        let (rx, tx): (u64, u64) = (p[5].parse().unwrap(), p[6].parse().unwrap());
        let m = (
            peer_metric(&body, "tunfwd_peer_bytes_total", &c.b_public, "rx"),
            peer_metric(&body, "tunfwd_peer_bytes_total", &c.b_public, "tx"),
        );
        if m == (rx, tx) {
            break;
        }
        // The server renders at most once a second.
        assert!(
            std::time::Instant::now() < deadline,
            "dump {rx}/{tx}, metrics {m:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(rx > 0);
    // The same endpoint and latest handshake in /metrics.
    let body = scrape(&topo.a, metrics);
    let endpoint_line = format!(
        "tunfwd_peer_endpoint_info{{peer=\"{}\",endpoint=\"{UNDERLAY_B}:{WG_PORT}\"}} 1",
        c.b_public
    );
    assert!(body.contains(&endpoint_line), "{endpoint_line} in\n{body}");
    let hs_metric = body
        .lines()
        .find(|l| {
            l.starts_with("tunfwd_peer_last_handshake_timestamp_seconds") && l.contains(&c.b_public)
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("a handshake time in\n{body}"));
    assert_eq!(
        hs_metric as u64, handshake,
        "dump and /metrics: one handshake"
    );

    // wg set: a new peer with everything, then changed, then removed.
    let (_, new_public) = keypair();
    let (psk, _) = keypair();
    let psk_file = key_file(&dir, "psk", &psk);
    wg(
        &topo.a,
        &[
            "set",
            &dev_a,
            "peer",
            &new_public,
            "preshared-key",
            &psk_file,
            "endpoint",
            "198.18.0.9:4000",
            "persistent-keepalive",
            "25",
            "allowed-ips",
            "198.19.9.0/24,2001:db8:9::/48",
        ],
    );
    let d = dump(&topo.a, &dev_a);
    let p = &d.peers[&new_public];
    assert_eq!(
        (p[1].as_str(), p[2].as_str(), p[3].as_str(), p[7].as_str()),
        (
            psk.as_str(),
            "198.18.0.9:4000",
            "198.19.9.0/24,2001:db8:9::/48",
            "25"
        ),
        "{p:?}"
    );
    wg(
        &topo.a,
        &[
            "set",
            &dev_a,
            "peer",
            &new_public,
            "endpoint",
            "[2001:db8::9]:4001",
            "persistent-keepalive",
            "off",
            "allowed-ips",
            "198.19.8.0/24",
        ],
    );
    let d = dump(&topo.a, &dev_a);
    let p = &d.peers[&new_public];
    assert_eq!(
        (p[2].as_str(), p[3].as_str(), p[7].as_str()),
        ("[2001:db8::9]:4001", "198.19.8.0/24", "off"),
        "{p:?}"
    );
    // A prefix moves to the peer it is given to, as in the kernel.
    wg(
        &topo.a,
        &[
            "set",
            &dev_a,
            "peer",
            &new_public,
            "allowed-ips",
            &format!("198.19.8.0/24,{OVERLAY6_B}/128"),
        ],
    );
    let d = dump(&topo.a, &dev_a);
    assert_eq!(d.peers[&c.b_public][3], format!("{OVERLAY_B}/32"));
    wg(
        &topo.a,
        &[
            "set",
            &dev_a,
            "peer",
            &c.b_public,
            "allowed-ips",
            &format!("{OVERLAY_B}/32,{OVERLAY6_B}/128"),
        ],
    );
    wg(&topo.a, &["set", &dev_a, "peer", &new_public, "remove"]);
    let d = dump(&topo.a, &dev_a);
    assert_eq!(d.peers.len(), 1, "removed");
    // The session with b went on through all of it: no new handshake.
    assert_eq!(d.peers[&c.b_public][4], handshake.to_string());
    assert!(topo.a.ping(OVERLAY6_B), "ping v6 after the changes");

    // fwmark: on the sockets, and reported.
    wg(&topo.a, &["set", &dev_a, "fwmark", "0x1234"]);
    assert_eq!(wg(&topo.a, &["show", &dev_a, "fwmark"]).trim(), "0x1234");
    let ss = String::from_utf8(topo.a.command(&["ss", "-uaen"]).output().unwrap().stdout).unwrap();
    assert!(ss.contains("fwmark:0x1234"), "{ss}");
    wg(&topo.a, &["set", &dev_a, "fwmark", "0"]);
    assert_eq!(wg(&topo.a, &["show", &dev_a, "fwmark"]).trim(), "off");
    // The listen port: the workers move to the new one (b follows a's
    // datagrams there); a port in use is refused, and nothing else of that
    // request happens.
    wg(&topo.a, &["set", &dev_a, "listen-port", "51820"]);
    wg(
        &topo.a,
        &["set", &dev_a, "listen-port", "51821", "fwmark", "7"],
    );
    let d = dump(&topo.a, &dev_a);
    assert_eq!(
        (d.interface[2].as_str(), d.interface[3].as_str()),
        ("51821", "0x7")
    );
    assert!(
        a.stderr()
            .contains("WireGuard listen port 51821: 1 worker(s) restarted")
    );
    assert!(topo.a.ping(OVERLAY_B), "ping from the new port");
    let ss = String::from_utf8(topo.a.command(&["ss", "-uaen"]).output().unwrap().stdout).unwrap();
    assert!(ss.contains(":51821 ") && ss.contains("fwmark:0x7"), "{ss}");
    assert!(!ss.contains(":51820 "), "the old port is closed: {ss}");
    let taken = topo
        .a
        .spawn(|| UdpSocket::bind("[::]:51822").unwrap())
        .join()
        .unwrap();
    let err = wg_fails(
        &topo.a,
        &["set", &dev_a, "listen-port", "51822", "fwmark", "9"],
    );
    assert!(err.contains("Address already in use"), "{err}");
    let d = dump(&topo.a, &dev_a);
    assert_eq!(
        (d.interface[2].as_str(), d.interface[3].as_str()),
        ("51821", "0x7")
    );
    drop(taken);
    wg(
        &topo.a,
        &["set", &dev_a, "listen-port", "51820", "fwmark", "0"],
    );
    assert!(topo.a.ping(OVERLAY_B), "ping from the first port again");

    // The private key: a new one is taken (b does not know it: no more
    // ping), the old one brings the tunnel back.
    let (other_private, other_public) = keypair();
    wg(
        &topo.a,
        &[
            "set",
            &dev_a,
            "private-key",
            &key_file(&dir, "k2", &other_private),
        ],
    );
    assert_eq!(
        wg(&topo.a, &["show", &dev_a, "public-key"]).trim(),
        other_public
    );
    wg(
        &topo.a,
        &[
            "set",
            &dev_a,
            "private-key",
            &key_file(&dir, "k1", &c.a_private),
        ],
    );
    assert_eq!(
        wg(&topo.a, &["show", &dev_a, "public-key"]).trim(),
        c.a_public
    );
    assert!(topo.a.ping(OVERLAY_B), "ping with the key back");

    // setconf, addconf, syncconf with files as wg reads them.
    let (_, x) = keypair();
    let (_, y) = keypair();
    let base = std::fs::read_to_string(&c.a).unwrap();
    let extra = |k: &str, net: &str| format!("\n[Peer]\nPublicKey = {k}\nAllowedIPs = {net}\n");
    let set_file = private_file(
        &dir.0,
        "set.conf",
        &(base.clone() + &extra(&x, "198.19.20.0/24")),
    );
    let add_file = private_file(
        &dir.0,
        "add.conf",
        &format!("[Interface]\n{}", extra(&y, "198.19.21.0/24")),
    );
    wg(&topo.a, &["setconf", &dev_a, set_file.to_str().unwrap()]);
    let keys = |d: &Dump| d.peers.keys().cloned().collect::<Vec<_>>();
    let mut want = vec![c.b_public.clone(), x.clone()];
    want.sort();
    assert_eq!(keys(&dump(&topo.a, &dev_a)), want);
    wg(&topo.a, &["addconf", &dev_a, add_file.to_str().unwrap()]);
    want.push(y.clone());
    want.sort();
    assert_eq!(keys(&dump(&topo.a, &dev_a)), want);
    let before = dump(&topo.a, &dev_a).peers[&c.b_public][4].clone();
    wg(&topo.a, &["syncconf", &dev_a, c.a.to_str().unwrap()]);
    let d = dump(&topo.a, &dev_a);
    assert_eq!(keys(&d), std::slice::from_ref(&c.b_public));
    assert_eq!(d.peers[&c.b_public][4], before, "b's session untouched");
    assert!(topo.a.ping(OVERLAY_B), "ping after syncconf");

    // SIGHUP: the file read again, as wg syncconf would apply it (b's
    // session untouched); a file with an error changes nothing.
    let pid = nix::unistd::Pid::from_raw(a.child.id() as i32);
    let (_, w) = keypair();
    std::fs::write(&c.a, base.clone() + &extra(&w, "198.19.22.0/24")).unwrap();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    a.wait_for_stderr("WireGuard config reloaded from");
    let d = dump(&topo.a, &dev_a);
    let mut want = vec![c.b_public.clone(), w.clone()];
    want.sort();
    assert_eq!(keys(&d), want);
    assert_eq!(
        d.peers[&c.b_public][4], before,
        "b's session untouched by the reload"
    );
    std::fs::write(&c.a, base.clone() + &extra(&w, &format!("{OVERLAY_B}/32"))).unwrap();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    a.wait_for_stderr("WireGuard reload refused, nothing changed");
    assert_eq!(keys(&dump(&topo.a, &dev_a)), want);
    assert!(topo.a.ping(OVERLAY_B), "ping after the reloads");

    assert!(a.terminate().success());
    assert!(b.terminate().success());
    assert!(
        !std::path::Path::new(&sock).exists(),
        "socket removed at exit"
    );
    // The JSON summary says the same of b: endpoint, handshake, bytes.
    let out = a.stdout();
    let summary: serde_json::Value = out
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .expect("a JSON summary");
    let peer = summary["peers"]["top"]
        .as_array()
        .and_then(|t| t.iter().find(|p| p["peer"] == c.b_public.as_str()))
        .unwrap_or_else(|| panic!("b in {summary}"));
    assert_eq!(
        peer["endpoint"],
        format!("{UNDERLAY_B}:{WG_PORT}").as_str(),
        "{peer}"
    );
    assert!(peer["last_handshake_s_ago"].as_f64().is_some(), "{peer}");
    assert!(peer["tx_bytes"].as_u64().unwrap() > 4 << 20, "{peer}");
    assert!(!a.stderr().contains(&c.a_private) && !a.stdout().contains(&c.a_private));
}

/// A raw request on the API socket `sock`: `bytes` written, the write side
/// closed if `close`, and whatever the server answered before closing.
fn raw_request(sock: &str, bytes: &[u8], close: bool) -> String {
    use std::io::Read as _;
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // A huge request meets a closed connection part way: fine.
    let _ = s.write_all(bytes);
    if close {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// During a running verified transfer a -> b: `wg syncconf` adds and
/// removes other peers, and hostile clients (garbage, a request cut off, a
/// request over the size limit, 100 connections held open) meet the API.
/// The transfer is intact and was still running when the change came,
/// nothing a hostile client sent changed anything, `wg show` answered
/// while the connections were held, b's session was never renewed, and
/// memory stayed bounded.
fn syncconf_and_hostile_clients(engine: &str) {
    let topo = Topology::new();
    let dir = Dir::new("sync");
    let c = Confs::write(&dir, false);
    let dev = iface(&engine[..1]);
    let sock = format!("/var/run/wireguard/{dev}.sock");
    let mut b = Proc::tunfwd(&topo.b, &wg_args(engine, false, &c.b));
    let mut a = Proc::tunfwd(&topo.a, &wg_args_dev(engine, true, &c.a, &dev));
    assert!(topo.a.ping(OVERLAY_B), "{engine}: ping");
    let (_, gone) = keypair();
    wg(
        &topo.a,
        &["set", &dev, "peer", &gone, "allowed-ips", "198.19.40.0/24"],
    );
    let session = dump(&topo.a, &dev).peers[&c.b_public][4].clone();
    let rss_before = rss_kib(a.child.id());

    let total = 24u64 << 20;
    let progress = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let transfer = {
        let (from, to, progress) = (
            Netns::existing(&topo.a.name),
            Netns::existing(&topo.b.name),
            progress.clone(),
        );
        let dst: SocketAddr = format!("{OVERLAY_B}:7300").parse().unwrap();
        std::thread::spawn(move || {
            verified_tcp_transfer_observed(&from, &to, dst, total, Some(progress), Some(4 << 20))
        })
    };
    a.wait_until("a quarter of the transfer", |_| {
        (progress.load(Ordering::Relaxed) >= total / 4).then_some(())
    });

    // syncconf: `gone` leaves, two peers come.
    let (_, x) = keypair();
    let (_, y) = keypair();
    let base = std::fs::read_to_string(&c.a).unwrap();
    let file = private_file(
        &dir.0,
        "sync.conf",
        &format!(
            "{base}\n[Peer]\nPublicKey = {x}\nAllowedIPs = 198.19.41.0/24\n\
             [Peer]\nPublicKey = {y}\nAllowedIPs = 198.19.42.0/24\nEndpoint = 198.18.0.9:9\n"
        ),
    );
    wg(&topo.a, &["syncconf", &dev, file.to_str().unwrap()]);
    let changed_at = progress.load(Ordering::Relaxed);
    let mut want = vec![c.b_public.clone(), x.clone(), y.clone()];
    want.sort();
    let keys = |d: &Dump| d.peers.keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&dump(&topo.a, &dev)), want, "{engine}");

    // Hostile clients.
    let hex = |k: &str| {
        use base64::Engine as _;
        let b = base64::engine::general_purpose::STANDARD.decode(k).unwrap();
        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
    };
    let (_, z) = keypair();
    // Garbage: the connection is closed, nothing answered.
    assert_eq!(raw_request(&sock, b"hello there\n\n", true), "");
    // A set cut off before its blank line: refused, nothing added.
    let cut = format!("set=1\npublic_key={}\nallowed_ip=198.19.43.0/24\n", hex(&z));
    assert_eq!(
        raw_request(&sock, cut.as_bytes(), true),
        format!("errno=-{}\n\n", libc::EPROTO)
    );
    // A bad value inside a set: refused whole (the peer before it too).
    let bad = format!(
        "set=1\npublic_key={}\nallowed_ip=198.19.43.0/24\nendpoint=nowhere\n\n",
        hex(&z)
    );
    assert_eq!(
        raw_request(&sock, bad.as_bytes(), true),
        format!("errno=-{}\n\n", libc::EINVAL)
    );
    // Over the size limit: refused.
    let mut huge = format!("set=1\npublic_key={}\n", hex(&z)).into_bytes();
    while huge.len() < 3 << 20 {
        huge.extend_from_slice(b"allowed_ip=198.19.44.0/24\n");
    }
    huge.extend_from_slice(b"\n");
    assert_eq!(
        raw_request(&sock, &huge, false),
        format!("errno=-{}\n\n", libc::EPROTO)
    );
    assert_eq!(
        keys(&dump(&topo.a, &dev)),
        want,
        "{engine}: nothing changed"
    );
    // 100 connections held open: wg still answers (the oldest make room).
    let held: Vec<_> = (0..100)
        .map(|_| std::os::unix::net::UnixStream::connect(&sock).unwrap())
        .collect();
    let show = wg(&topo.a, &["show", &dev]);
    assert!(show.contains(&c.b_public), "{engine}: {show}");
    drop(held);

    assert_eq!(transfer.join().expect("the transfer"), total, "{engine}");
    assert!(
        changed_at < total,
        "{engine}: the change met a running transfer"
    );
    let d = dump(&topo.a, &dev);
    assert_eq!(
        d.peers[&c.b_public][4], session,
        "{engine}: b's session untouched"
    );
    let rss_after = rss_kib(a.child.id());
    assert!(
        rss_after < rss_before + 32 * 1024,
        "{engine}: RSS {rss_before} -> {rss_after} KiB"
    );
    assert!(a.terminate().success());
    assert!(b.terminate().success());
    eprintln!(
        "{engine}: syncconf at {changed_at} of {total} bytes; RSS {rss_before} -> {rss_after} KiB"
    );
}

#[test]
fn syncconf_and_hostile_api_clients_during_a_transfer() {
    let test = "syncconf_and_hostile_api_clients_during_a_transfer";
    if !can_run_kernel_tests(test) || !have_tools(test, WG_TOOLS) {
        return;
    }
    for engine in engines("syncconf_and_hostile_api_clients_during_a_transfer") {
        syncconf_and_hostile_clients(engine);
    }
}

/// The pid of the process running `tunfwd-wg IFACE`.
fn tunfwd_wg_pid(iface: &str) -> Option<i32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
        let is = args.first()?.ends_with(b"tunfwd-wg") && args.get(1) == Some(&iface.as_bytes());
        is.then_some(pid)
    })
}

/// `wg-quick up`, then `down`, of an ordinary wg-quick file in namespace
/// a with `WG_QUICK_USERSPACE_IMPLEMENTATION=tunfwd-wg` (engine through
/// `TUNFWD_WG_FLAGS`), against wireguard-go in b configured by `wg`. b's
/// endpoint is reached through a's default route, so with `AllowedIPs =
/// 0.0.0.0/0, ::/0` (`default_route`) only the fwmark wg-quick sets keeps
/// the tunnel's own datagrams out of it. Ping IPv4 and IPv6, verified TCP;
/// after `down` no device, no socket, and the daemon exited with 0.
fn wg_quick(engine: &str, default_route: bool) {
    let what = format!("{engine}, default route {default_route}");
    let topo = Topology::new();
    let dir = Dir::new("quick");
    // b's endpoint address is off a's link: a reaches it by its default
    // route.
    const ENDPOINT_B: &str = "198.18.1.2";
    topo.b
        .ip(&["addr", "add", &format!("{ENDPOINT_B}/32"), "dev", "veth0"]);
    topo.a.ip(&["route", "add", "default", "via", UNDERLAY_B]);
    topo.a.ip(&["link", "set", "lo", "up"]);
    let (a_private, a_public) = keypair();
    let (b_private, b_public) = keypair();
    let b_conf = private_file(
        &dir.0,
        "b.conf",
        &wg_conf(
            &b_private,
            &a_public,
            None,
            &format!("{OVERLAY_A}/32, {OVERLAY6_A}/128"),
        ),
    );
    let go = WireguardGo::start(
        &topo.b,
        &b_conf,
        &[&format!("{OVERLAY_B}/24"), &format!("{OVERLAY6_B}/64")],
    );
    let dev = iface(&format!("q{}{}", &engine[..1], u8::from(default_route)));
    let allowed = if default_route {
        "0.0.0.0/0, ::/0".to_string()
    } else {
        format!("{OVERLAY_B}/32, {OVERLAY6_B}/128")
    };
    let d = dir.0.display();
    let file = private_file(
        &dir.0,
        &format!("{dev}.conf"),
        &format!(
            "[Interface]\nAddress = {OVERLAY_A}/24, {OVERLAY6_A}/64\nPrivateKey = {a_private}\n\
             ListenPort = {WG_PORT}\nMTU = 1420\nPostUp = touch {d}/up-%i\nPostDown = touch {d}/down-%i\n\n\
             [Peer]\nPublicKey = {b_public}\nEndpoint = {ENDPOINT_B}:{WG_PORT}\nAllowedIPs = {allowed}\n\
             PersistentKeepalive = 25\n"
        ),
    );
    let quick = |verb: &str| {
        let out = topo
            .a
            .command(&["wg-quick", verb, file.to_str().unwrap()])
            .env(
                "WG_QUICK_USERSPACE_IMPLEMENTATION",
                env!("CARGO_BIN_EXE_tunfwd-wg"),
            )
            .env("TUNFWD_WG_FLAGS", format!("--engine {engine}"))
            .env("TUNFWD_WG_LOG", dir.0.join("log"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{what}: wg-quick {verb}: {text}");
        text
    };
    // Orphans come to this process, so the daemon's exit can be read.
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let up = quick("up");
    assert!(up.contains(&format!("tunfwd-wg {dev}")), "{what}: {up}");
    let sock = format!("/var/run/wireguard/{dev}.sock");
    assert!(std::path::Path::new(&sock).exists(), "{what}: {sock}");
    let pid = tunfwd_wg_pid(&dev).expect("the tunfwd-wg daemon");
    assert!(
        dir.0.join(format!("up-{dev}")).exists(),
        "{what}: PostUp ran"
    );

    assert!(topo.a.ping(OVERLAY_B), "{what}: ping");
    assert!(topo.a.ping(OVERLAY6_B), "{what}: ping IPv6");
    let dst: SocketAddr = format!("{OVERLAY_B}:7400").parse().unwrap();
    verified_tcp_transfer(&topo.a, &topo.b, dst, 8 << 20);
    let show = wg(&topo.a, &["show", &dev]);
    assert!(
        show.contains(&format!("peer: {b_public}")) && show.contains("latest handshake"),
        "{what}: {show}"
    );
    if default_route {
        // wg-quick's mark is on tunfwd's sockets, and the endpoint is
        // reached outside the tunnel because of it.
        assert_eq!(wg(&topo.a, &["show", &dev, "fwmark"]).trim(), "0xca6c");
        let ss =
            String::from_utf8(topo.a.command(&["ss", "-uaen"]).output().unwrap().stdout).unwrap();
        assert!(ss.contains("fwmark:0xca6c"), "{what}: {ss}");
        let rules =
            String::from_utf8(topo.a.command(&["ip", "rule"]).output().unwrap().stdout).unwrap();
        assert!(
            rules.contains("not from all fwmark 0xca6c"),
            "{what}: {rules}"
        );
    }
    let transfer = go.show(&topo.b, "transfer");
    assert!(transfer.contains(&a_public), "{what}: {transfer}");

    quick("down");
    assert!(!topo.a.has_link(&dev), "{what}: the device is gone");
    assert!(
        dir.0.join(format!("down-{dev}")).exists(),
        "{what}: PostDown ran"
    );
    // The daemon exits by itself, cleanly, removing its socket.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
        match waitpid(nix::unistd::Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(s) => break s,
            Err(e) => panic!("{what}: wait for the daemon {pid}: {e}"),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: the daemon {pid} did not exit"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        status,
        nix::sys::wait::WaitStatus::Exited(nix::unistd::Pid::from_raw(pid), 0),
        "{what}"
    );
    assert!(tunfwd_wg_pid(&dev).is_none(), "{what}: no process left");
    assert!(
        !std::path::Path::new(&sock).exists(),
        "{what}: the socket is gone"
    );
    let log = std::fs::read_to_string(dir.0.join("log")).unwrap();
    assert!(
        log.contains(&format!("{dev} was deleted: stopped")),
        "{what}: {log}"
    );
    assert!(!log.contains(&a_private), "no key in the log");
    eprintln!("{what}: wg-quick up:\n{up}");
}

#[test]
fn wg_quick_runs_tunfwd_wg() {
    let test = "wg_quick_runs_tunfwd_wg";
    let tools = [
        WG_TOOLS,
        &[("wg-quick", "wireguard-tools"), ("nft", "nftables")],
    ]
    .concat();
    if !can_run_kernel_tests(test) || !have_tools(test, &tools) {
        return;
    }
    for engine in engines(test) {
        for default_route in [false, true] {
            wg_quick(engine, default_route);
        }
    }
}
