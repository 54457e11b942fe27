//! The userspace WireGuard baseline: Debian's `wireguard-go` on both sides
//! of the bench topology, configured with `wg setconf` (wireguard-tools),
//! on its own overlay (198.19.4.0/24). Also the `wg setconf` files of
//! tunfwd's `+wg` targets.

use std::net::{IpAddr, Ipv4Addr};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::forwarders::process_cpu_seconds;
use super::topology::{Topology, UNDERLAY_A, UNDERLAY_B};
use crate::error::{Context, Error, Result};
use crate::wg::Secret;

/// wireguard-go's overlay.
pub const OVERLAY_A: Ipv4Addr = Ipv4Addr::new(198, 19, 4, 1);
pub const OVERLAY_B: Ipv4Addr = Ipv4Addr::new(198, 19, 4, 2);
/// Its UDP port (tunfwd's targets use their own).
const PORT: u16 = 51820;

/// A key pair for each side.
pub struct Keys {
    pub a: Secret,
    pub b: Secret,
}

impl Keys {
    pub fn new() -> Result<Keys> {
        let make = || Secret::generate().context(|| "read random bytes from /dev/urandom");
        Ok(Keys {
            a: make()?,
            b: make()?,
        })
    }
}

/// A `wg setconf` file: `own` key on `port`, one peer (`peer`'s public
/// key) at `at:port` owning `addr`.
pub fn conf(own: &Secret, peer: &Secret, port: u16, at: Ipv4Addr, addr: Ipv4Addr) -> String {
    format!(
        "[Interface]\nPrivateKey = {}\nListenPort = {port}\n\n[Peer]\nPublicKey = {}\n\
         Endpoint = {at}:{port}\nAllowedIPs = {addr}/32\n",
        own.to_base64(),
        peer.public_key()
    )
}

/// Writes `text` to a new file only its owner may read.
pub fn write_private(path: &std::path::Path, text: &str) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .context(|| format!("write {}", path.display()))
}

/// `nsenter --net=NS PROGRAM ARGS...`, which must succeed.
fn run_in(ns: &str, program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new("nsenter")
        .arg(format!("--net={ns}"))
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context(|| format!("run {program} (is it installed?)"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::config(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// wireguard-go in both namespaces; stopped (and its files removed) on
/// drop.
pub struct WireguardGo {
    children: Vec<Child>,
    names: Vec<String>,
    dir: std::path::PathBuf,
}

impl WireguardGo {
    /// Starts and configures both sides, and waits until each has its
    /// interface up. Needs `wireguard-go` and `wg` (wireguard-tools).
    pub fn start(topo: &Topology) -> Result<WireguardGo> {
        let dir = std::env::temp_dir().join(format!("tunfwd-bench-wggo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).context(|| format!("create {}", dir.display()))?;
        let mut w = WireguardGo {
            children: Vec::new(),
            names: Vec::new(),
            dir,
        };
        let keys = Keys::new()?;
        let sides = [
            (
                &topo.a, "a", &keys.a, &keys.b, UNDERLAY_B, OVERLAY_B, OVERLAY_A,
            ),
            (
                &topo.b, "b", &keys.b, &keys.a, UNDERLAY_A, OVERLAY_A, OVERLAY_B,
            ),
        ];
        for (ns, side, own, peer, at, peer_addr, addr) in sides {
            // Its UAPI socket is /var/run/wireguard/NAME.sock, shared by
            // every namespace: a name of this run's own.
            let name = format!("tfwg{}{side}", std::process::id() % 1_000_000);
            let path = ns.proc_path();
            let child = Command::new("nsenter")
                .arg(format!("--net={path}"))
                .args(["wireguard-go", "-f", &name])
                .env("WG_PROCESS_FOREGROUND", "1")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context(|| "start wireguard-go (apt-get install wireguard-go)")?;
            w.children.push(child);
            w.names.push(name.clone());
            // Ready when its UAPI socket answers (10 s hang guard).
            let deadline = Instant::now() + Duration::from_secs(10);
            while run_in(&path, "wg", &["show", &name]).is_err() {
                if Instant::now() > deadline {
                    return Err(Error::config(format!(
                        "wireguard-go did not set up {name} within 10 s (wireguard-tools installed?)"
                    )));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let file = w.dir.join(format!("{side}.conf"));
            write_private(&file, &conf(own, peer, PORT, at, peer_addr))?;
            run_in(
                &path,
                "wg",
                &["setconf", &name, &file.display().to_string()],
            )?;
            let cidr = crate::types::Cidr {
                addr: IpAddr::V4(addr),
                prefix_len: 24,
            };
            let dev = name.clone();
            ns.run(move || crate::device::configure_link(&dev, None, &[cidr], None))?;
        }
        Ok(w)
    }

    /// User + system CPU seconds both have used so far.
    pub fn cpu_seconds(&self) -> f64 {
        self.children
            .iter()
            .map(|c| process_cpu_seconds(c.id() as i32))
            .sum()
    }

    /// The scheduler's figures for each (all their threads).
    pub fn sched(&self) -> Vec<(String, super::sched::Sched)> {
        ["a", "b"]
            .iter()
            .zip(&self.children)
            .map(|(side, c)| (side.to_string(), super::sched::sample(c.id() as i32, None)))
            .collect()
    }

    /// Stops both.
    pub fn stop(self) {
        drop(self)
    }
}

impl Drop for WireguardGo {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in &self.names {
            let _ = std::fs::remove_file(format!("/var/run/wireguard/{n}.sock"));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
