//! Test helpers for real-kernel tests: uniquely named network namespaces that
//! are removed on every exit path (Drop runs on panic too), tunfwd processes
//! that are killed when dropped, threads running inside a namespace, and a
//! verified TCP transfer.
//!
//! Helpers may use the `ip` command to build the topology; the product never does.
#![allow(dead_code)]

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};
use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn, sendto, socket,
};

/// Overlay and underlay addresses of the test topology: underlay 198.18.0.0/30 on veth, overlay 198.19.0.0/24 and 2001:db8:19::/64 on the tunnel.
pub const UNDERLAY_A: &str = "198.18.0.1";
pub const UNDERLAY_B: &str = "198.18.0.2";
pub const OVERLAY_A: &str = "198.19.0.1";
pub const OVERLAY_B: &str = "198.19.0.2";
pub const OVERLAY6_A: &str = "2001:db8:19::1";
pub const OVERLAY6_B: &str = "2001:db8:19::2";
pub const PORT: u16 = 5000;

/// The tunfwd binary under test.
pub fn tunfwd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_tunfwd")
}

/// True if real-kernel tests can run here (root, /dev/net/tun, the tools
/// they drive). When they cannot, the test fails with a message naming what
/// is missing (the packages to install), unless the user asked to skip them
/// with `TUNFWD_SKIP_KERNEL_TESTS=1` (never under `CI=true`): then it prints
/// `SKIP ...` and the caller returns early.
pub fn can_run_kernel_tests(test: &str) -> bool {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root".to_string());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        missing.push("/dev/net/tun (the tun module)".to_string());
    }
    let mut packages = Vec::new();
    for (tool, package) in [
        ("ip", "iproute2"),
        ("ping", "iputils-ping"),
        ("socat", "socat"),
        ("iperf3", "iperf3"),
        ("ethtool", "ethtool"),
    ] {
        if Command::new(tool)
            .arg(if tool == "ip" { "-V" } else { "-h" })
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            missing.push(tool.to_string());
            packages.push(package);
        }
    }
    if missing.is_empty() {
        return true;
    }
    let install = if packages.is_empty() {
        String::new()
    } else {
        format!(" (apt-get install -y {})", packages.join(" "))
    };
    fail_or_skip(&format!("{test}: needs {}{install}", missing.join(", ")));
    false
}

/// A real-kernel test cannot run (`msg` says why): it fails, unless the
/// user asked to skip those tests (never under `CI=true`); then a SKIP
/// line.
fn fail_or_skip(msg: &str) {
    let ci = std::env::var("CI").as_deref() == Ok("true");
    let skip = std::env::var("TUNFWD_SKIP_KERNEL_TESTS").as_deref() == Ok("1");
    if ci || !skip {
        panic!(
            "{msg}{}",
            if ci {
                " (CI=true: real-kernel tests must run)"
            } else {
                "; run as root with those installed, or set TUNFWD_SKIP_KERNEL_TESTS=1 to skip the real-kernel tests"
            }
        );
    }
    report_skip(msg);
}

/// True if the `(tool, package)` pairs a test drives beyond the usual
/// ones are installed (each tool must answer `--version`). Missing ones
/// fail the test with the packages to install, unless the user asked to
/// skip real-kernel tests (never under `CI=true`): then a SKIP line.
pub fn have_tools(test: &str, tools: &[(&str, &str)]) -> bool {
    let missing: Vec<&(&str, &str)> = tools
        .iter()
        .filter(|(tool, _)| {
            Command::new(tool)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_err()
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    let names: Vec<&str> = missing.iter().map(|t| t.0).collect();
    let packages: Vec<&str> = missing.iter().map(|t| t.1).collect();
    fail_or_skip(&format!(
        "{test}: needs {} (apt-get install -y {})",
        names.join(", "),
        packages.join(" ")
    ));
    false
}

/// VmRSS of the running process `pid` in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("VmRSS in {status}"))
}

/// Says that a test (or some of its cases) was skipped, where the user sees
/// it: straight to the process's stderr (the test harness captures only the
/// print macros) and, when `TUNFWD_SKIP_LOG` names a file (as
/// `tests/run.sh` sets it), appended there so the run can count the skips.
pub fn report_skip(msg: &str) {
    let line = format!("SKIP {msg}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
    if let Ok(path) = std::env::var("TUNFWD_SKIP_LOG") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = f.write_all(line.as_bytes());
        }
    }
}

/// Whether a ring can be set up here (checked once): the io_uring engine's
/// first need. `Err` says why not (e.g. `kernel.io_uring_disabled=2`).
pub fn uring_available() -> Result<(), String> {
    static AVAILABLE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    AVAILABLE
        .get_or_init(|| {
            io_uring::IoUring::new(8)
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .clone()
}

/// True if the user asked to skip the io_uring cases (`TUNFWD_SKIP_URING=1`).
pub fn uring_skip_asked() -> bool {
    std::env::var("TUNFWD_SKIP_URING").as_deref() == Ok("1")
}

/// Whether the io_uring cases of `test` run. Where io_uring is unusable they
/// are skipped with a SKIP line, but only when the user asked for it
/// ([`uring_skip_asked`]); otherwise the test fails, naming the cause.
pub fn uring_usable(test: &str) -> bool {
    let Err(e) = uring_available() else {
        return true;
    };
    let msg = format!("{test}: io_uring cases: io_uring is not usable here ({e})");
    if uring_skip_asked() {
        report_skip(&msg);
        return false;
    }
    panic!("{msg}; set TUNFWD_SKIP_URING=1 to skip the io_uring cases (kernel.io_uring_disabled?)");
}

/// The engines `test` runs under: poll, and uring unless it is unusable and
/// the user asked to skip it ([`uring_usable`]).
pub fn engines(test: &str) -> Vec<&'static str> {
    if uring_usable(test) {
        vec!["poll", "uring"]
    } else {
        vec!["poll"]
    }
}

/// Runs a command to completion, panicking with its output if it fails.
pub fn run(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawn {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a command, returning whether it succeeded.
pub fn run_ok(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A network namespace, deleted on drop (unless it is a borrowed handle
/// from [`Netns::existing`]).
pub struct Netns {
    pub name: String,
    owned: bool,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "tfw{}-{}-{tag}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        run(&["ip", "netns", "add", &name]);
        let ns = Netns { name, owned: true };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// A handle to a namespace another `Netns` owns (for use on another
    /// thread); dropping it leaves the namespace alone.
    pub fn existing(name: &str) -> Netns {
        Netns {
            name: name.to_string(),
            owned: false,
        }
    }

    /// `ip -n NAME ARGS...`, which must succeed.
    pub fn ip(&self, args: &[&str]) -> Output {
        let mut full = vec!["ip", "-n", &self.name];
        full.extend_from_slice(args);
        run(&full)
    }

    /// `ip netns exec NAME ARGS...` as a command to configure and spawn.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        c
    }

    /// Runs ARGS inside the namespace; true on success.
    pub fn run_ok(&self, args: &[&str]) -> bool {
        self.command(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// True if interface `dev` exists in the namespace.
    pub fn has_link(&self, dev: &str) -> bool {
        run_ok(&["ip", "-n", &self.name, "link", "show", dev])
    }

    /// Spawns `f` on a new thread whose network namespace is this one: every
    /// socket it opens lives here.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        let path = format!("/run/netns/{}", self.name);
        thread::spawn(move || {
            let fd = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            setns(&fd, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns {path}: {e}"));
            f()
        })
    }

    /// `ping` from this namespace; true if all replies came back.
    pub fn ping(&self, addr: &str) -> bool {
        self.run_ok(&["ping", "-c", "3", "-i", "0.2", "-W", "2", addr])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Two namespaces joined by a veth pair: 198.18.0.1/30 (a) - 198.18.0.2/30 (b).
pub struct Topology {
    pub a: Netns,
    pub b: Netns,
}

impl Topology {
    pub fn new() -> Topology {
        let a = Netns::new("a");
        let b = Netns::new("b");
        // Both ends are created directly inside their namespaces, so parallel
        // tests never collide on names in the root namespace.
        run(&[
            "ip", "link", "add", "veth0", "netns", &a.name, "type", "veth", "peer", "name",
            "veth0", "netns", &b.name,
        ]);
        a.ip(&["addr", "add", "198.18.0.1/30", "dev", "veth0"]);
        b.ip(&["addr", "add", "198.18.0.2/30", "dev", "veth0"]);
        a.ip(&["link", "set", "veth0", "up"]);
        b.ip(&["link", "set", "veth0", "up"]);
        Topology { a, b }
    }
}

impl Default for Topology {
    fn default() -> Self {
        Topology::new()
    }
}

/// Arguments of `tunfwd tunnel` for side a or b of the topology.
pub fn tunnel_args(side_a: bool, extra: &[&str]) -> Vec<String> {
    let (me, peer, o4, o6) = if side_a {
        (UNDERLAY_A, UNDERLAY_B, OVERLAY_A, OVERLAY6_A)
    } else {
        (UNDERLAY_B, UNDERLAY_A, OVERLAY_B, OVERLAY6_B)
    };
    let mut v: Vec<String> = vec![
        "tunnel".into(),
        "--dev".into(),
        "tun0".into(),
        "--address".into(),
        format!("{o4}/24"),
        "--address".into(),
        format!("{o6}/64"),
        "--listen".into(),
        format!("{me}:{PORT}"),
        "--peer".into(),
        format!("{peer}:{PORT}"),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// Arguments of `tunfwd tunnel` in TAP/VXLAN mode (VNI 42, port 4789,
/// MTU 1450) for side a or b, plus `extra`.
pub fn tap_args(side_a: bool, engine: &str, extra: &[&str]) -> Vec<String> {
    tap_args_mtu(side_a, engine, 1450, extra)
}

/// As [`tap_args`], with the given MTU.
pub fn tap_args_mtu(side_a: bool, engine: &str, mtu: u32, extra: &[&str]) -> Vec<String> {
    let (me, peer, addr, addr6) = if side_a {
        (UNDERLAY_A, UNDERLAY_B, "198.19.2.1/24", "2001:db8:2::1/64")
    } else {
        (UNDERLAY_B, UNDERLAY_A, "198.19.2.2/24", "2001:db8:2::2/64")
    };
    [
        "tunnel",
        "--engine",
        engine,
        "--mode",
        "tap",
        "--vni",
        "42",
        "--dev",
        "tap0",
        "--mtu",
        &mtu.to_string(),
        "--address",
        addr,
        "--address",
        addr6,
        "--listen",
        &format!("{me}:4789"),
        "--peer",
        &format!("{peer}:4789"),
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(extra.iter().map(|s| s.to_string()))
    .collect()
}

/// A running process whose output is collected; killed on drop.
pub struct Proc {
    pub child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

fn collect(r: impl Read + Send + 'static, into: Arc<Mutex<String>>) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut r = BufReader::new(r);
        let mut line = String::new();
        while let Ok(n) = r.read_line(&mut line) {
            if n == 0 {
                break;
            }
            into.lock().unwrap().push_str(&line);
            line.clear();
        }
    })
}

impl Proc {
    pub fn spawn(mut cmd: Command) -> Proc {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let readers = vec![
            collect(child.stdout.take().unwrap(), stdout.clone()),
            collect(child.stderr.take().unwrap(), stderr.clone()),
        ];
        Proc {
            child,
            stdout,
            stderr,
            readers,
        }
    }

    /// Starts `tunfwd ARGS` in `ns` and waits until it reports the tunnel up.
    pub fn tunfwd(ns: &Netns, args: &[String]) -> Proc {
        let mut cmd = ns.command(&[tunfwd_bin()]);
        cmd.args(args);
        let mut p = Proc::spawn(cmd);
        p.wait_for_stderr("tunnel up");
        p
    }

    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits (up to 20 s, a hang guard, not a performance bound) for `needle`
    /// on stderr; panics with the output if the process exits first.
    pub fn wait_for_stderr(&mut self, needle: &str) {
        self.wait_for(needle, true)
    }

    pub fn wait_for_stdout(&mut self, needle: &str) {
        self.wait_for(needle, false)
    }

    fn wait_for(&mut self, needle: &str, stderr: bool) {
        let what = format!("{needle:?}");
        self.wait_until(&what, |p| {
            let text = if stderr { p.stderr() } else { p.stdout() };
            text.contains(needle).then_some(())
        });
    }

    /// Waits (up to 20 s, a hang guard) until the latest interval stats
    /// line (`tunfwd: stats t=...`; start the process with
    /// `--stats-interval`) satisfies `ready`; returns that line. Panics
    /// with the output if the process exits first.
    pub fn wait_for_stats(&mut self, what: &str, ready: impl Fn(&str) -> bool) -> String {
        self.wait_until(&format!("a stats line with {what}"), |p| {
            let out = p.stdout();
            let line = out
                .lines()
                .rev()
                .find(|l| l.starts_with("tunfwd: stats t="))?;
            ready(line).then(|| line.to_string())
        })
    }

    /// Polls `check` until it gives a value (up to 20 s, a hang guard, not
    /// a performance bound); panics with the output if the process exits
    /// first or the time runs out.
    pub fn wait_until<T>(&mut self, what: &str, check: impl Fn(&Proc) -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(v) = check(self) {
                return v;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                self.join_readers();
                panic!(
                    "process exited ({status}) before {what}\nstdout:\n{}\nstderr:\n{}",
                    self.stdout(),
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within 20 s\nstdout:\n{}\nstderr:\n{}",
                self.stdout(),
                self.stderr()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn join_readers(&mut self) {
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }

    /// Waits up to `secs` for exit; None if still running.
    pub fn wait_timeout(&mut self, secs: u64) -> Option<ExitStatus> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                self.join_readers();
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and waits for exit (10 s hang guard).
    pub fn terminate(&mut self) -> ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        self.wait_timeout(10).unwrap_or_else(|| {
            panic!(
                "process did not exit within 10 s of SIGTERM\nstderr:\n{}",
                self.stderr()
            )
        })
    }
}

impl Drop for Proc {
    /// SIGTERM first, so tunfwd removes what it made (devices, the
    /// WireGuard API socket in the host's /var/run/wireguard); SIGKILL if
    /// it has not exited within 5 s.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Every `key=value` on the first line containing `line_tag`, parsed, in
/// order (a summary line has `packets=` once per direction).
pub fn stat_values<T: std::str::FromStr>(text: &str, line_tag: &str, key: &str) -> Vec<T> {
    let line = text
        .lines()
        .find(|l| l.contains(line_tag))
        .unwrap_or_else(|| panic!("no line with {line_tag:?} in:\n{text}"));
    let pat = format!("{key}=");
    line.split(|c: char| c.is_whitespace() || c == '[' || c == ']')
        .filter_map(|tok| tok.strip_prefix(&pat))
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{key} in {line}")))
        .collect()
}

/// The first `key=value` number on the line with `line_tag` (0 if absent).
pub fn stat(text: &str, line_tag: &str, key: &str) -> u64 {
    stat_values(text, line_tag, key)
        .first()
        .copied()
        .unwrap_or(0)
}

/// The first `key=value` number of one direction (`tun_to_peer` or
/// `peer_to_tun`) on the line with `line_tag` (0 if absent): a drop reason
/// appears in a direction's `[...]` list only when it counted something, so
/// the line is cut at the directions' boundary first.
pub fn direction_stat(text: &str, line_tag: &str, direction: &str, key: &str) -> u64 {
    let line = text
        .lines()
        .find(|l| l.contains(line_tag))
        .unwrap_or_else(|| panic!("no line with {line_tag:?} in:\n{text}"));
    let part = match line.split_once("| peer_to_tun") {
        Some((tx, _)) if direction == "tun_to_peer" => tx,
        Some((_, rx)) => rx,
        None => "",
    };
    let pat = format!("{key}=");
    part.split(|c: char| c.is_whitespace() || c == '[' || c == ']')
        .find_map(|tok| tok.strip_prefix(&pat)?.parse().ok())
        .unwrap_or(0)
}

/// The sum of every `key=value` on the line (e.g. both directions' packets).
pub fn stat_sum(text: &str, line_tag: &str, key: &str) -> u64 {
    stat_values::<u64>(text, line_tag, key).iter().sum()
}

/// Deterministic test data: xorshift64 words.
pub struct DataStream {
    state: u64,
}

impl DataStream {
    pub fn new(seed: u64) -> DataStream {
        DataStream { state: seed | 1 }
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let mut x = self.state;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.state = x;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// A 64-bit hash over a byte stream (FNV-style over 8-byte words; fine for
/// detecting corruption, not adversarial). Feed chunks that are multiples of 8
/// bytes except the last.
#[derive(Default)]
pub struct StreamHash {
    h: u64,
    len: u64,
    tail: Vec<u8>,
}

impl StreamHash {
    pub fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if !self.tail.is_empty() {
            let need = 8 - self.tail.len();
            let take = need.min(data.len());
            self.tail.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.tail.len() == 8 {
                let w = u64::from_le_bytes(self.tail[..].try_into().unwrap());
                self.word(w);
                self.tail.clear();
            }
        }
        let mut chunks = data.chunks_exact(8);
        for c in &mut chunks {
            self.word(u64::from_le_bytes(c.try_into().unwrap()));
        }
        self.tail.extend_from_slice(chunks.remainder());
    }

    fn word(&mut self, w: u64) {
        self.h = (self.h ^ w)
            .wrapping_mul(0x0000_0100_0000_01b3)
            .rotate_left(29);
    }

    pub fn finish(mut self) -> (u64, u64) {
        let tail = std::mem::take(&mut self.tail);
        for b in tail {
            self.word(u64::from(b));
        }
        (self.h ^ self.len, self.len)
    }
}

/// Sends `bytes` of deterministic data over TCP from namespace `from` to
/// `to_addr` (a listener started in namespace `to`), and checks the receiver
/// got exactly the same bytes (hash and length). Returns the byte count.
pub fn verified_tcp_transfer(from: &Netns, to: &Netns, to_addr: SocketAddr, bytes: u64) -> u64 {
    verified_tcp_transfer_observed(from, to, to_addr, bytes, None, None)
}

/// As [`verified_tcp_transfer`], with the receiver's byte count kept in
/// `progress` as it goes (so a test can act while the transfer runs and see
/// it go on afterwards), and the sender paced to at most `max_bytes_per_s`.
pub fn verified_tcp_transfer_observed(
    from: &Netns,
    to: &Netns,
    to_addr: SocketAddr,
    bytes: u64,
    progress: Option<Arc<std::sync::atomic::AtomicU64>>,
    max_bytes_per_s: Option<u64>,
) -> u64 {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let receiver = to.spawn(move || {
        // The port can still be held for a moment by the previous
        // transfer's listener or connection (seen rarely, under floods):
        // wait until it is free, at most 5 s.
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(to_addr) {
                Ok(l) => break l,
                Err(e)
                    if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline =>
                {
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e) => {
                    // Who holds the port (this thread is in the namespace).
                    let ss = Command::new("ss").arg("-tan").output();
                    let ss = ss.map(|o| String::from_utf8_lossy(&o.stdout).to_string());
                    panic!("bind listener {to_addr}: {e}\n{}", ss.unwrap_or_default());
                }
            }
        };
        ready_tx.send(()).unwrap();
        // accept() with a 30 s guard, so a broken tunnel fails the test.
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut s = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "no connection within 30 s");
                    thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut hash = StreamHash::default();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = s.read(&mut buf).expect("receive (30 s stall guard)");
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            if let Some(p) = &progress {
                p.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        hash.finish()
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("listener ready");
    let sender = from.spawn(move || {
        let mut s = TcpStream::connect_timeout(&to_addr, Duration::from_secs(10)).expect("connect");
        s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut data = DataStream::new(bytes ^ 0x5eed);
        let mut hash = StreamHash::default();
        let mut buf = vec![0u8; 1 << 16];
        let mut left = bytes;
        let started = Instant::now();
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            data.fill(&mut buf[..n]);
            s.write_all(&buf[..n]).expect("send (30 s stall guard)");
            hash.update(&buf[..n]);
            left -= n as u64;
            if let Some(rate) = max_bytes_per_s {
                // Pacing: a traffic shape, not a wait for readiness.
                let due = Duration::from_secs_f64((bytes - left) as f64 / rate as f64);
                if let Some(ahead) = due.checked_sub(started.elapsed()) {
                    thread::sleep(ahead);
                }
            }
        }
        s.shutdown(Shutdown::Write).unwrap();
        // Wait for the receiver to close, so every byte was read.
        let _ = s.read(&mut [0u8; 1]);
        hash.finish()
    });
    let sent = sender.join().expect("sender thread");
    let got = receiver.join().expect("receiver thread");
    assert_eq!(got.1, bytes, "received byte count");
    assert_eq!(
        got, sent,
        "received bytes differ from sent bytes (hash, length)"
    );
    got.1
}

/// A counter of the kernel's SNMP tables in namespace `ns`: `file` is
/// `/proc/net/snmp` or `/proc/net/netstat`, `section` a line prefix such as
/// `Tcp` or `IpExt`, `name` the column.
pub fn kernel_counter(ns: &Netns, file: &str, section: &str, name: &str) -> u64 {
    let out = ns.command(&["cat", file]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let prefix = format!("{section}:");
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with(&prefix)).collect();
    let [names, values] = lines[..] else {
        panic!("no {section} lines in {file}: {text}");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("{section} {name} in {file}"))
}

/// Internet checksum (RFC 1071) over `data`.
pub fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += u32::from(w);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A well-formed IPv4/UDP packet (header checksum set, UDP checksum 0 = none).
pub fn ipv4_udp_packet(
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let total = 28 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    let csum = inet_checksum(&p[..20]);
    p[10..12].copy_from_slice(&csum.to_be_bytes());
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&dport.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[28..].copy_from_slice(payload);
    p
}

/// Runs iperf3 (TCP, `secs` seconds) from `client` to `server_addr` served in
/// `server`; returns received bits per second.
pub fn iperf3_tcp(client: &Netns, server: &Netns, server_addr: &str, secs: u32, port: u16) -> f64 {
    let mut srv = Proc::spawn(server.command(&[
        "iperf3",
        "-s",
        "-1",
        "--forceflush",
        "-B",
        server_addr,
        "-p",
        &port.to_string(),
    ]));
    srv.wait_for_stdout("Server listening");
    let out = client
        .command(&[
            "iperf3",
            "-c",
            server_addr,
            "-p",
            &port.to_string(),
            "-t",
            &secs.to_string(),
            "-J",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("spawn iperf3 client");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "iperf3 client failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&text).expect("iperf3 JSON");
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .expect("end.sum_received.bits_per_second")
}

// A hub and spokes on one bridge (tests/hub.rs, tests/wireguard.rs).

pub const HUB_UNDERLAY: &str = "198.18.1.1";

/// A spoke: its namespace and number (its addresses end in 1k).
pub struct Spoke {
    pub ns: Netns,
    pub k: u8,
}

impl Spoke {
    pub fn underlay(&self) -> String {
        format!("198.18.1.1{}", self.k)
    }
    pub fn inner4(&self) -> String {
        format!("198.19.0.1{}", self.k)
    }
    pub fn inner6(&self) -> String {
        format!("2001:db8:19::1{}", self.k)
    }
    /// Its line in the hub's peers file.
    pub fn peer_line(&self) -> String {
        format!(
            "{}:{PORT} {}/32, {}/128  # spoke {}\n",
            self.underlay(),
            self.inner4(),
            self.inner6(),
            self.k
        )
    }
    /// The hub's view of it, as the stats lines name it.
    pub fn peer_tag(&self) -> String {
        format!("peer={}:{PORT} ", self.underlay())
    }
}

/// The hub's namespace with a bridge on 198.18.1.1/24, forwarding on.
pub fn hub_namespace() -> Netns {
    let hub = Netns::new("hub");
    hub.ip(&["link", "add", "br0", "type", "bridge"]);
    hub.ip(&["addr", "add", &format!("{HUB_UNDERLAY}/24"), "dev", "br0"]);
    hub.ip(&["link", "set", "br0", "up"]);
    for kv in [
        "net.ipv4.ip_forward=1",
        "net.ipv6.conf.all.forwarding=1",
        "net.ipv4.conf.all.send_redirects=0",
        "net.ipv4.conf.default.send_redirects=0",
    ] {
        assert!(
            hub.run_ok(&["sysctl", "-qw", kv]),
            "sysctl {kv} in the hub's namespace"
        );
    }
    hub
}

/// Spoke `k` in its own namespace, plugged into the hub's bridge.
pub fn spoke(hub: &Netns, k: u8) -> Spoke {
    let s = Spoke {
        ns: Netns::new(&format!("spoke{k}")),
        k,
    };
    let port = format!("sp{k}");
    run(&[
        "ip", "link", "add", "veth0", "netns", &s.ns.name, "type", "veth", "peer", "name", &port,
        "netns", &hub.name,
    ]);
    hub.ip(&["link", "set", &port, "master", "br0"]);
    hub.ip(&["link", "set", &port, "up"]);
    s.ns.ip(&[
        "addr",
        "add",
        &format!("{}/24", s.underlay()),
        "dev",
        "veth0",
    ]);
    s.ns.ip(&["link", "set", "veth0", "up"]);
    s
}

/// A raw IPv4 socket that sends UDP datagrams with a chosen source address
/// and port (the kernel fills in the IP total length, id and checksum).
pub struct RawUdp {
    fd: std::os::fd::OwnedFd,
    header: [u8; 28],
    dst: SockaddrIn,
}

impl RawUdp {
    pub fn new(src: SocketAddr, dst: SocketAddr) -> RawUdp {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::Raw,
        )
        .expect("raw socket");
        let (SocketAddr::V4(s), SocketAddr::V4(d)) = (src, dst) else {
            panic!("IPv4 only");
        };
        let mut header = [0u8; 28];
        header[0] = 0x45;
        header[8] = 64;
        header[9] = 17;
        header[12..16].copy_from_slice(&s.ip().octets());
        header[16..20].copy_from_slice(&d.ip().octets());
        header[20..22].copy_from_slice(&s.port().to_be_bytes());
        header[22..24].copy_from_slice(&d.port().to_be_bytes());
        RawUdp {
            fd,
            header,
            dst: SockaddrIn::from(d),
        }
    }

    /// Later datagrams come from `src` (IPv4).
    pub fn set_source(&mut self, src: SocketAddr) {
        let SocketAddr::V4(s) = src else {
            panic!("IPv4 only");
        };
        self.header[12..16].copy_from_slice(&s.ip().octets());
        self.header[20..22].copy_from_slice(&s.port().to_be_bytes());
    }

    pub fn send(&mut self, payload: &[u8]) {
        use std::os::fd::AsRawFd;
        let mut pkt = self.header.to_vec();
        pkt[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        pkt.extend_from_slice(payload);
        loop {
            match sendto(self.fd.as_raw_fd(), &pkt, &self.dst, MsgFlags::empty()) {
                Ok(_) => return,
                Err(nix::errno::Errno::ENOBUFS) | Err(nix::errno::Errno::EAGAIN) => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(e) => panic!("raw send of {} bytes: {e}", payload.len()),
            }
        }
    }
}

/// Sends `count` datagrams from `make`, paced at about `pps` per second.
pub fn paced(count: usize, pps: usize, mut send: impl FnMut(usize)) {
    let burst = 100;
    let pause = Duration::from_secs_f64(burst as f64 / pps as f64);
    for start in (0..count).step_by(burst) {
        for i in start..(start + burst).min(count) {
            send(i);
        }
        std::thread::sleep(pause);
    }
}

/// The worker threads (`tunfwd-qN`) of process `pid`: each one's name
/// and its /proc/PID/task/TID directory (none if the process is gone).
pub fn worker_tasks(pid: u32) -> Vec<(String, std::path::PathBuf)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|t| {
            let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
            let comm = comm.trim_end();
            comm.starts_with("tunfwd-q")
                .then(|| (comm.to_string(), t.path()))
        })
        .collect()
}

/// How many worker threads (`tunfwd-q*`) process `pid` runs.
pub fn worker_threads(pid: u32) -> usize {
    worker_tasks(pid).len()
}

/// How many CPUs this process may use (its affinity, from
/// /proc/self/status `Cpus_allowed_list`, e.g. `0-3,6`).
pub fn usable_cpus() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list in /proc/self/status")
        .trim();
    list.split(',')
        .map(|part| match part.split_once('-') {
            Some((a, b)) => b.parse::<usize>().unwrap() - a.parse::<usize>().unwrap() + 1,
            None => 1,
        })
        .sum()
}
