//! WireGuard mode against the real kernel: keys interchangeable with `wg`,
//! tunfwd against Debian's wireguard-go (each side initiating, ping IPv4
//! and IPv6, verified TCP both ways) under both engines, and tunfwd against
//! tunfwd. Need root, wireguard-go and wireguard-tools; under CI=true they
//! fail instead of skipping.

#![cfg(target_os = "linux")]

mod common;

use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

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
    let mut s = format!(
        "[Interface]\nPrivateKey = {private}\nListenPort = {WG_PORT}\n\n[Peer]\nPublicKey = {peer_public}\nAllowedIPs = {allowed}\n"
    );
    if let Some(e) = endpoint {
        s.push_str(&format!("Endpoint = {e}\n"));
    }
    s
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
        }
    }
}

/// `tunfwd tunnel` in WireGuard mode with `conf`, as side a or b of the
/// topology (its overlay addresses on tun0).
fn wg_args(engine: &str, side_a: bool, conf: &std::path::Path) -> Vec<String> {
    let (o4, o6) = if side_a {
        (OVERLAY_A, OVERLAY6_A)
    } else {
        (OVERLAY_B, OVERLAY6_B)
    };
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
    let topo = Topology::new();
    let dir = Dir::new("interop");
    // wireguard-go learns tunfwd's endpoint from its handshake, unless it
    // is the one to initiate.
    let c = Confs::write(&dir, !tunfwd_first);
    let (a_priv, a_pub, a_conf, b_conf) = (c.a_private, c.a_public, c.a, c.b);
    let wg = WireguardGo::start(
        &topo.b,
        &b_conf,
        &[&format!("{OVERLAY_B}/24"), &format!("{OVERLAY6_B}/64")],
    );
    let mut a = Proc::tunfwd(&topo.a, &wg_args(engine, true, &a_conf));
    a.wait_for_stderr("wireguard udp [::]:51820");
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
        let topo = Topology::new();
        let mut b = Proc::tunfwd(&topo.b, &wg_args(engine, false, &b_conf));
        let mut a = Proc::tunfwd(&topo.a, &wg_args(engine, true, &a_conf));
        assert!(topo.a.ping(OVERLAY_B), "{engine}: ping a->b");
        assert!(topo.b.ping(OVERLAY6_A), "{engine}: ping b->a v6");
        let dst: SocketAddr = format!("{OVERLAY_B}:7000").parse().unwrap();
        verified_tcp_transfer(&topo.a, &topo.b, dst, 16 << 20);
        assert!(a.terminate().success());
        assert!(b.terminate().success());
        let out = b.stdout();
        assert!(
            stat(&out, "summary total", "wg_handshake_messages") >= 1,
            "{out}"
        );
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
