//! macOS utun: a `PF_SYSTEM` control socket connected to
//! `com.apple.net.utun_control` (the control id looked up with `CTLIOCGINFO`),
//! unit N+1 for `utunN` or 0 for the next free one; the kernel-chosen name
//! is read back with `UTUN_OPT_IFNAME`.
//!
//! Every packet on the socket is prefixed with a 4-byte address family in
//! network byte order. [`TunQueue`](super::TunQueue) reads it into a separate
//! 4-byte buffer and writes it from one (`readv`/`writev`), so the packet
//! itself is never copied and the rest of tunfwd sees raw IP packets.
//!
//! Type-checked for aarch64- and x86_64-apple-darwin; not run in CI.

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
use nix::sys::socket::{
    AddressFamily, SockFlag, SockProtocol, SockType, SysControlAddr, connect, socket,
};
use nix::sys::uio::{readv, writev};

use crate::error::{Context, Error, Result};
use crate::sys;
use crate::types::Cidr;

/// The default `--dev`: the next free utun unit.
pub const DEFAULT_NAME: &str = "utun%d";

const UTUN_CONTROL: &str = "com.apple.net.utun_control";
/// Length of the address-family prefix on every utun packet.
const AF_HEADER_LEN: usize = 4;

/// `utun%d` (any unit) or `utunN`; utun devices cannot have other names.
pub fn check_name(name: &str) -> Result<()> {
    parse_unit(name).map(|_| ())
}

/// The control-socket unit for a device name: 0 lets the kernel choose.
fn parse_unit(name: &str) -> Result<u32> {
    let bad = || {
        Error::config(format!(
            "--dev {name:?}: on macOS the device is utun%d (next free) or utunN"
        ))
    };
    let rest = name.strip_prefix("utun").ok_or_else(bad)?;
    if rest == "%d" {
        return Ok(0);
    }
    let n: u32 = rest.parse().map_err(|_| bad())?;
    n.checked_add(1).ok_or_else(bad)
}

impl super::TunQueue {
    /// Reads one packet into `buf`, without its address-family prefix.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut af = [0u8; AF_HEADER_LEN];
        let n = readv(
            &self.file,
            &mut [IoSliceMut::new(&mut af), IoSliceMut::new(buf)],
        )?;
        // A read shorter than the prefix carries no packet: report it empty
        // (the forwarder counts it as such).
        Ok(n.saturating_sub(AF_HEADER_LEN))
    }

    /// Writes one IP packet, with the address-family prefix its version
    /// calls for.
    pub fn write(&self, packet: &[u8]) -> io::Result<usize> {
        let af = match packet.first().map(|b| b >> 4) {
            Some(6) => libc::AF_INET6,
            _ => libc::AF_INET,
        };
        let hdr = (af as u32).to_be_bytes();
        let n = writev(&self.file, &[IoSlice::new(&hdr), IoSlice::new(packet)])?;
        Ok(n.saturating_sub(AF_HEADER_LEN))
    }

    /// Writes one IP packet gathered from `pieces` (at most
    /// [`MAX_WRITE_PIECES`](crate::packet::offload::MAX_WRITE_PIECES)), with
    /// the address-family prefix its version calls for.
    pub fn write_gather(&self, pieces: &[IoSlice<'_>]) -> io::Result<usize> {
        let version = pieces.iter().find(|p| !p.is_empty()).map(|p| p[0] >> 4);
        let af = match version {
            Some(6) => libc::AF_INET6,
            _ => libc::AF_INET,
        };
        let hdr = (af as u32).to_be_bytes();
        let mut io = [IoSlice::new(&[]); 1 + crate::packet::offload::MAX_WRITE_PIECES];
        io[0] = IoSlice::new(&hdr);
        let n = pieces.len().min(io.len() - 1);
        io[1..=n].copy_from_slice(&pieces[..n]);
        let n = writev(&self.file, &io[..=n])?;
        Ok(n.saturating_sub(AF_HEADER_LEN))
    }
}

/// Errors that say the utun socket is unusable: the worker must stop.
pub fn is_fatal_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADF) | Some(libc::ENODEV) | Some(libc::ENXIO) | Some(libc::ENOTCONN)
    )
}

/// An open utun device: its name and its one socket.
#[derive(Debug)]
pub struct TunDevice {
    name: String,
    file: File,
}

impl TunDevice {
    /// Creates a utun device. It disappears when the socket closes.
    /// Only `opts.name` may vary on macOS: one queue, created by this
    /// process, no virtio-net header, no TAP (config validation says so
    /// before this is reached).
    pub fn open(opts: &super::TunOptions<'_>) -> Result<TunDevice> {
        let unit = parse_unit(opts.name)?;
        if opts.queues != 1 || opts.attach || opts.vnet_hdr || opts.tap {
            return Err(Error::config(
                "on macOS a utun device has one queue, is always created, and carries IP \
                 packets only (no --queues, --attach, --offload or --mode tap)",
            ));
        }
        let what = format!("create utun device {}", opts.name);
        let fd: OwnedFd = socket(
            AddressFamily::System,
            SockType::Datagram,
            SockFlag::empty(),
            SockProtocol::KextControl,
        )
        .map_err(io::Error::from)
        .context(|| format!("{what}: open PF_SYSTEM control socket"))?;
        fcntl(&fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
            .map_err(io::Error::from)
            .context(|| format!("{what}: set close-on-exec"))?;
        let addr = SysControlAddr::from_name(fd.as_raw_fd(), UTUN_CONTROL, unit)
            .map_err(io::Error::from)
            .context(|| format!("{what}: look up {UTUN_CONTROL} (CTLIOCGINFO)"))?;
        connect(fd.as_raw_fd(), &addr)
            .map_err(io::Error::from)
            .context(|| format!("{what}: connect to unit {unit}"))
            .map_err(|e| e.with_hint("creating utun devices needs root"))?;
        fcntl(&fd, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))
            .map_err(io::Error::from)
            .context(|| format!("{what}: set nonblocking"))?;
        let name = sys::utun_ifname(fd.as_fd())
            .context(|| format!("{what}: read its name (UTUN_OPT_IFNAME)"))?;
        Ok(TunDevice {
            name,
            file: File::from(fd),
        })
    }

    /// The interface name the kernel gave the device.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Always true: utun devices live as long as their socket.
    pub fn created(&self) -> bool {
        true
    }

    /// Another handle on the same device (its descriptor duplicated).
    pub fn try_clone(&self) -> Result<TunDevice> {
        let file = self
            .file
            .try_clone()
            .map_err(|e| Error::io(format!("duplicate the descriptor of {}", self.name), e))?;
        Ok(TunDevice {
            name: self.name.clone(),
            file,
        })
    }

    /// Hands out the one queue.
    pub fn into_queues(self) -> Vec<super::TunQueue> {
        vec![super::TunQueue::from(self.file)]
    }

    /// Sets the MTU, adds the addresses and brings the link up. IPv4
    /// addresses are point-to-point with the far end set to the address
    /// itself; routes to other prefixes are the user's (`route add`).
    pub fn configure(&self, mtu: u32, addresses: &[Cidr], txqueuelen: Option<u32>) -> Result<()> {
        let name = &self.name;
        if txqueuelen.is_some() {
            return Err(Error::config("--txqueuelen needs Linux"));
        }
        let sock = control_socket(AddressFamily::Inet)?;
        sys::set_mtu(sock.as_fd(), name, mtu).context(|| format!("set MTU {mtu} on {name}"))?;
        let mut sock6 = None;
        for c in addresses {
            match c.addr {
                IpAddr::V4(a) => sys::add_ipv4_addr(sock.as_fd(), name, a, c.prefix_len)
                    .context(|| format!("add address {c} to {name}"))?,
                IpAddr::V6(a) => {
                    if sock6.is_none() {
                        sock6 = Some(control_socket(AddressFamily::Inet6)?);
                    }
                    if let Some(s6) = &sock6 {
                        sys::add_ipv6_addr(s6.as_fd(), name, a, c.prefix_len)
                            .context(|| format!("add address {c} to {name}"))?;
                    }
                }
            }
        }
        sys::set_link_up(sock.as_fd(), name).context(|| format!("bring up {name}"))
    }
}

fn control_socket(family: AddressFamily) -> Result<OwnedFd> {
    socket(family, SockType::Datagram, SockFlag::empty(), None)
        .map_err(io::Error::from)
        .context(|| format!("open {family:?} control socket for interface ioctls"))
}
