//! Linux TUN: `/dev/net/tun`, `TUNSETIFF` with `IFF_TUN | IFF_NO_PI |
//! IFF_MULTI_QUEUE`, one open file per queue.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::IpAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use nix::net::if_::if_nametoindex;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};

use crate::error::{Context, Error, Result};
use crate::sys;
use crate::types::Cidr;

const TUN_PATH: &str = "/dev/net/tun";

/// The default `--dev`: the kernel numbers it.
pub const DEFAULT_NAME: &str = "tunfwd%d";

impl super::TunQueue {
    /// Reads one packet (frame) into `buf`.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one packet (frame).
    pub fn write(&self, packet: &[u8]) -> io::Result<usize> {
        (&self.file).write(packet)
    }

    /// Writes one packet (frame) gathered from `pieces`, in one system call.
    pub fn write_gather(&self, pieces: &[io::IoSlice<'_>]) -> io::Result<usize> {
        (&self.file).write_vectored(pieces)
    }
}

/// Errors that say the TUN device is gone or unusable: the worker must stop.
pub fn is_fatal_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADF) | Some(libc::EBADFD) | Some(libc::ENODEV) | Some(libc::ENXIO)
    )
}

/// Validates a device name or `%d` template before any system call.
pub fn check_name(name: &str) -> Result<()> {
    sys::check_ifname(name).map_err(|e| Error::config(format!("--dev: {e}")))
}

/// Offloads the TUN device accepted (`TUNSETOFFLOAD`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TunOffloads {
    /// Checksum offload and TCP segmentation (TSO4, TSO6).
    pub tso: bool,
    /// UDP segmentation (USO4, USO6; Linux 6.2+).
    pub uso: bool,
}

/// An open TUN device: its name and one nonblocking file per queue.
///
/// A device this process created disappears when the last queue file closes;
/// a pre-existing (persistent) device stays.
#[derive(Debug)]
pub struct TunDevice {
    name: String,
    queues: Vec<File>,
    created: bool,
}

impl TunDevice {
    /// Creates the device, or attaches to it if it exists already.
    pub fn open(opts: &super::TunOptions<'_>) -> Result<TunDevice> {
        check_name(opts.name)?;
        let templated = opts.name.contains('%');
        let existed = !templated && if_nametoindex(opts.name).is_ok();
        if opts.attach && !existed {
            return Err(Error::config(format!(
                "attach to TUN device {}: no such device",
                opts.name
            ))
            .with_hint(format!(
                "create it first, e.g. `ip tuntap add dev {} mode tun multi_queue`, or drop --attach",
                opts.name
            )));
        }

        // One queue of a multi-queue device, without packet information.
        let kind = if opts.tap {
            libc::IFF_TAP
        } else {
            libc::IFF_TUN
        };
        let mut flags = kind | libc::IFF_NO_PI | libc::IFF_MULTI_QUEUE;
        if opts.vnet_hdr {
            flags |= libc::IFF_VNET_HDR;
        }
        let mut name = opts.name.to_string();
        let mut queues = Vec::with_capacity(opts.queues);
        for q in 0..opts.queues {
            let what = || format!("open TUN queue {q} of {name}");
            let file = open_tun_file().map_err(|e| {
                let hint = match e.raw_os_error() {
                    Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => {
                        Some("no /dev/net/tun: load the tun module with `modprobe tun`")
                    }
                    _ => None,
                };
                let err = Error::io(format!("{}: {TUN_PATH}", what()), e);
                match hint {
                    Some(h) => err.with_hint(h),
                    None => err,
                }
            })?;
            let result = match sys::tun_set_iff(file.as_fd(), &name, flags) {
                // A persistent device made without multi_queue accepts a
                // single-queue attach only.
                Err(e) if existed && opts.queues == 1 && e.raw_os_error() == Some(libc::EINVAL) => {
                    flags &= !libc::IFF_MULTI_QUEUE;
                    sys::tun_set_iff(file.as_fd(), &name, flags)
                }
                other => other,
            };
            name = result.map_err(|e| {
                let hint = match e.raw_os_error() {
                    Some(libc::EINVAL) if existed => Some(format!(
                        "{name} exists but is not a TUN device, or its multi_queue setting differs"
                    )),
                    Some(libc::EBUSY) => Some(format!(
                        "{name} is in use by another process and is not multi-queue"
                    )),
                    _ => None,
                };
                let err = Error::io(what(), e);
                match hint {
                    Some(h) => err.with_hint(h),
                    None => err,
                }
            })?;
            queues.push(file);
        }
        Ok(TunDevice {
            name,
            queues,
            created: !existed,
        })
    }

    /// True if a device `name` exists and takes one queue only (a
    /// persistent device made without multi_queue), as the kernel reports
    /// it over rtnetlink: nothing is attached to the device to find out, so
    /// a device in use by another process loses no packet to a probe.
    /// False where the kernel does not say (no such device, a name
    /// template like `tun%d`, not a TUN/TAP device): opening it then
    /// creates one, or fails with its own hint.
    pub fn takes_one_queue(name: &str) -> bool {
        matches!(crate::netlink::tun_multi_queue(name), Ok(Some(false)))
    }

    /// Sets the virtio-net header size and enables as many offloads as the
    /// kernel accepts: checksum + TSO4/6 (+ TSO_ECN), and USO4/6 where
    /// available. Only for devices opened with `vnet_hdr`.
    pub fn enable_offloads(&self) -> Result<TunOffloads> {
        let name = &self.name;
        let Some(q0) = self.queues.first() else {
            return Ok(TunOffloads::default());
        };
        for (i, q) in self.queues.iter().enumerate() {
            sys::tun_set_vnet_hdr_sz(q.as_fd(), crate::packet::virtio::LEN as i32)
                .context(|| format!("set virtio-net header size on queue {i} of {name}"))?;
        }
        let tso = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN;
        let uso = libc::TUN_F_USO4 | libc::TUN_F_USO6;
        if sys::tun_set_offload(q0.as_fd(), tso | uso).is_ok() {
            return Ok(TunOffloads {
                tso: true,
                uso: true,
            });
        }
        sys::tun_set_offload(q0.as_fd(), tso)
            .context(|| format!("enable TSO on {name} (TUNSETOFFLOAD)"))?;
        Ok(TunOffloads {
            tso: true,
            uso: false,
        })
    }

    /// Caps the segments the kernel puts in one TSO/USO super-packet for this
    /// device so that its datagrams, at most `mtu` bytes each, always fit one
    /// UDP GSO send (64 datagrams and 65,507 bytes at most): a super-packet
    /// then never needs a second send whose tail could be overtaken.
    /// Returns the cap.
    pub fn limit_gso_segments(&self, mtu: usize) -> Result<u32> {
        let segs = crate::packet::offload::gso_segments_per_send(mtu) as u32;
        let index = interface_index(&self.name)?;
        crate::netlink::request(
            &format!("limit GSO segments of {} to {segs}", self.name),
            crate::netlink::gso_max_segs_request(index, segs),
        )?;
        Ok(segs)
    }

    /// Sets the Ethernet address (TAP devices).
    pub fn set_mac(&self, mac: [u8; 6]) -> Result<()> {
        let sock = control_socket(AddressFamily::Inet)?;
        let m = mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        sys::set_mac(sock.as_fd(), &self.name, mac)
            .context(|| format!("set MAC address {m} on {}", self.name))
    }

    /// The interface name the kernel gave the device.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// True if this process created the device (it goes away with us).
    pub fn created(&self) -> bool {
        self.created
    }

    /// Another handle on the same device: every queue's descriptor
    /// duplicated (the same queues). Held while workers restart, it keeps
    /// the device and its queues.
    pub fn try_clone(&self) -> Result<TunDevice> {
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(q, f)| {
                f.try_clone()
                    .map_err(|e| Error::io(format!("duplicate TUN queue {q} of {}", self.name), e))
            })
            .collect::<Result<Vec<File>>>()?;
        Ok(TunDevice {
            name: self.name.clone(),
            queues,
            created: self.created,
        })
    }

    /// Hands out the queues, one per worker.
    pub fn into_queues(self) -> Vec<super::TunQueue> {
        self.queues.into_iter().map(super::TunQueue::from).collect()
    }

    /// Sets MTU, transmit queue length (None: the device keeps its own),
    /// addresses, and link up.
    pub fn configure(&self, mtu: u32, addresses: &[Cidr], txqueuelen: Option<u32>) -> Result<()> {
        configure_link(&self.name, Some(mtu), addresses, txqueuelen)
    }
}

/// Configures any interface in the calling thread's network namespace: MTU
/// and transmit queue length (if given), addresses, then link up.
pub fn configure_link(
    name: &str,
    mtu: Option<u32>,
    addresses: &[Cidr],
    txqueuelen: Option<u32>,
) -> Result<()> {
    let sock = control_socket(AddressFamily::Inet)?;
    if let Some(mtu) = mtu {
        sys::set_mtu(sock.as_fd(), name, mtu).context(|| format!("set MTU {mtu} on {name}"))?;
    }
    if let Some(q) = txqueuelen {
        sys::set_txqueuelen(sock.as_fd(), name, q)
            .context(|| format!("set txqueuelen {q} on {name}"))?;
    }
    for c in addresses {
        if let IpAddr::V4(a) = c.addr {
            sys::set_ipv4_addr(sock.as_fd(), name, a, c.prefix_len)
                .context(|| format!("set address {c} on {name}"))?;
        }
    }
    sys::set_link_up(sock.as_fd(), name).context(|| format!("bring up {name}"))?;
    let v6: Vec<_> = addresses.iter().filter(|c| c.addr.is_ipv6()).collect();
    if !v6.is_empty() {
        let sock6 = control_socket(AddressFamily::Inet6)?;
        let ifindex = interface_index(name)?;
        for c in v6 {
            let IpAddr::V6(a) = c.addr else {
                continue;
            };
            match sys::add_ipv6_addr(sock6.as_fd(), ifindex, a, c.prefix_len) {
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                r => r.context(|| format!("add address {c} to {name}"))?,
            }
        }
    }
    Ok(())
}

/// The interface index of `name` in the calling thread's namespace.
pub fn interface_index(name: &str) -> Result<u32> {
    if_nametoindex(name)
        .map_err(io::Error::from)
        .context(|| format!("look up interface index of {name}"))
}

fn open_tun_file() -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(TUN_PATH)
}

fn control_socket(family: AddressFamily) -> Result<OwnedFd> {
    socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)
        .map_err(io::Error::from)
        .context(|| format!("open {family:?} control socket for interface ioctls"))
}
