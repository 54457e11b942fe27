//! Linux interface ioctls (TUNSETIFF and the SIOCSIF* family), and
//! `recvmsg`/`sendmsg` with raw address and control buffers.
//!
//! Request numbers come from `libc`. Each public function takes the control
//! socket or TUN fd as a `BorrowedFd`, so the descriptor is live for the call.
#![allow(unsafe_code)]

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, BorrowedFd};

use libc::{c_char, c_int, c_short};

/// An `ifreq` naming one interface.
struct IfReq(libc::ifreq);

impl IfReq {
    fn new(name: &str) -> io::Result<IfReq> {
        check_ifname(name)?;
        // SAFETY: `ifreq` is a plain C struct of integer arrays and a union of
        // integers, sockaddrs and one raw pointer; all-zero bytes are a valid
        // value for every one of them.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as c_char;
        }
        Ok(IfReq(ifr))
    }

    fn name(&self) -> String {
        let bytes: Vec<u8> = self
            .0
            .ifr_name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// Validates an interface name the way the kernel's `dev_valid_name` does.
pub fn check_ifname(name: &str) -> io::Result<()> {
    let ok = !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace());
    if ok {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "invalid interface name {name:?}: 1 to {} bytes, no '/', ':' or whitespace",
                libc::IFNAMSIZ - 1
            ),
        ))
    }
}

/// `ioctl(fd, request, arg)` for requests that take a pointer to an `ifreq`.
fn ifreq_ioctl(fd: BorrowedFd<'_>, request: libc::Ioctl, ifr: &mut IfReq) -> io::Result<()> {
    // Every request passed here (TUNSETIFF, SIOCGIFFLAGS,
    // SIOCSIF{FLAGS,MTU,TXQLEN,ADDR,NETMASK}) reads and/or writes exactly one
    // `struct ifreq`.
    let arg = &mut ifr.0 as *mut libc::ifreq;
    // SAFETY: `fd` is live for the call (BorrowedFd); `arg` points to a valid,
    // exclusively borrowed `ifreq`, the one type these requests use.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), request, arg) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Attaches the `/dev/net/tun` file `tun` to interface `name` (a `%d`
/// template lets the kernel pick the number) with `flags` (`IFF_TUN`,
/// `IFF_NO_PI`, `IFF_MULTI_QUEUE`, ...). Returns the interface's actual name.
pub fn tun_set_iff(tun: BorrowedFd<'_>, name: &str, flags: c_int) -> io::Result<String> {
    let mut ifr = IfReq::new(name)?;
    ifr.0.ifr_ifru.ifru_flags = flags as c_short;
    ifreq_ioctl(tun, libc::TUNSETIFF, &mut ifr)?;
    Ok(ifr.name())
}

/// Sets the virtio-net header size of a TUN device opened with
/// `IFF_VNET_HDR` (`TUNSETVNETHDRSZ`).
pub fn tun_set_vnet_hdr_sz(tun: BorrowedFd<'_>, bytes: c_int) -> io::Result<()> {
    let mut v = bytes;
    // SAFETY: `tun` is live; TUNSETVNETHDRSZ reads one int through the
    // pointer, which points to `v` for the duration of the call.
    let ret = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETVNETHDRSZ, &mut v as *mut c_int) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Tells a TUN device which offloads userspace accepts (`TUNSETOFFLOAD`,
/// `TUN_F_*` flags): super-packets of those kinds may then be read from it.
pub fn tun_set_offload(tun: BorrowedFd<'_>, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: `tun` is live; TUNSETOFFLOAD takes its argument by value (an
    // unsigned long), no memory is passed.
    let ret = unsafe {
        libc::ioctl(
            tun.as_raw_fd(),
            libc::TUNSETOFFLOAD,
            libc::c_ulong::from(flags),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The interface flags (`IFF_UP`, ...) of `name`.
pub fn if_flags(sock: BorrowedFd<'_>, name: &str) -> io::Result<c_short> {
    let mut ifr = IfReq::new(name)?;
    ifreq_ioctl(sock, libc::SIOCGIFFLAGS, &mut ifr)?;
    // SAFETY: SIOCGIFFLAGS succeeded, so the kernel stored the flags in
    // `ifru_flags`; every bit pattern is a valid c_short.
    Ok(unsafe { ifr.0.ifr_ifru.ifru_flags })
}

pub fn set_if_flags(sock: BorrowedFd<'_>, name: &str, flags: c_short) -> io::Result<()> {
    let mut ifr = IfReq::new(name)?;
    ifr.0.ifr_ifru.ifru_flags = flags;
    ifreq_ioctl(sock, libc::SIOCSIFFLAGS, &mut ifr)
}

/// Sets `IFF_UP` on `name`, keeping its other flags.
pub fn set_link_up(sock: BorrowedFd<'_>, name: &str) -> io::Result<()> {
    let flags = if_flags(sock, name)?;
    set_if_flags(sock, name, flags | libc::IFF_UP as c_short)
}

pub fn set_mtu(sock: BorrowedFd<'_>, name: &str, mtu: u32) -> io::Result<()> {
    let mut ifr = IfReq::new(name)?;
    ifr.0.ifr_ifru.ifru_mtu = c_int::try_from(mtu).map_err(|_| invalid("MTU too large"))?;
    ifreq_ioctl(sock, libc::SIOCSIFMTU, &mut ifr)
}

pub fn set_txqueuelen(sock: BorrowedFd<'_>, name: &str, packets: u32) -> io::Result<()> {
    let mut ifr = IfReq::new(name)?;
    // `ifr_qlen` is the int member of the union, shared with ifru_metric.
    ifr.0.ifr_ifru.ifru_metric =
        c_int::try_from(packets).map_err(|_| invalid("txqueuelen too large"))?;
    ifreq_ioctl(sock, libc::SIOCSIFTXQLEN, &mut ifr)
}

/// Sets the Ethernet address of a TAP interface.
pub fn set_mac(sock: BorrowedFd<'_>, name: &str, mac: [u8; 6]) -> io::Result<()> {
    let mut ifr = IfReq::new(name)?;
    let mut data = [0 as c_char; 14];
    for (dst, src) in data.iter_mut().zip(mac) {
        *dst = src as c_char;
    }
    ifr.0.ifr_ifru.ifru_hwaddr = libc::sockaddr {
        sa_family: libc::ARPHRD_ETHER,
        sa_data: data,
    };
    ifreq_ioctl(sock, libc::SIOCSIFHWADDR, &mut ifr)
}

/// A `sockaddr` holding an AF_INET address (port 0), built field by field.
fn sockaddr_v4(addr: Ipv4Addr) -> libc::sockaddr {
    let mut data = [0 as c_char; 14];
    // sockaddr_in layout after the family: 2 bytes port, 4 bytes address.
    for (dst, src) in data[2..6].iter_mut().zip(addr.octets()) {
        *dst = src as c_char;
    }
    libc::sockaddr {
        sa_family: libc::AF_INET as libc::sa_family_t,
        sa_data: data,
    }
}

/// Sets the primary IPv4 address and prefix length of `name` on an AF_INET
/// control socket. The kernel adds the connected route.
pub fn set_ipv4_addr(
    sock: BorrowedFd<'_>,
    name: &str,
    addr: Ipv4Addr,
    prefix_len: u8,
) -> io::Result<()> {
    if prefix_len > 32 {
        return Err(invalid("IPv4 prefix length above 32"));
    }
    let mut ifr = IfReq::new(name)?;
    ifr.0.ifr_ifru.ifru_addr = sockaddr_v4(addr);
    ifreq_ioctl(sock, libc::SIOCSIFADDR, &mut ifr)?;
    let mask = crate::types::v4_mask(prefix_len);
    let mut ifr = IfReq::new(name)?;
    ifr.0.ifr_ifru.ifru_netmask = sockaddr_v4(Ipv4Addr::from(mask));
    ifreq_ioctl(sock, libc::SIOCSIFNETMASK, &mut ifr)
}

/// Adds an IPv6 address to interface `ifindex` on an AF_INET6 control socket.
pub fn add_ipv6_addr(
    sock6: BorrowedFd<'_>,
    ifindex: u32,
    addr: Ipv6Addr,
    prefix_len: u8,
) -> io::Result<()> {
    if prefix_len > 128 {
        return Err(invalid("IPv6 prefix length above 128"));
    }
    let mut req = libc::in6_ifreq {
        ifr6_addr: libc::in6_addr {
            s6_addr: addr.octets(),
        },
        ifr6_prefixlen: u32::from(prefix_len),
        ifr6_ifindex: c_int::try_from(ifindex).map_err(|_| invalid("ifindex too large"))?,
    };
    // SAFETY: `sock6` is live (BorrowedFd); SIOCSIFADDR on an AF_INET6 socket
    // reads one `struct in6_ifreq`, which `req` is, fully initialised.
    let ret = unsafe {
        libc::ioctl(
            sock6.as_raw_fd(),
            libc::SIOCSIFADDR,
            &mut req as *mut libc::in6_ifreq,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn invalid(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// The kernel's `TCP_INFO` for a TCP socket.
pub fn tcp_info(sock: BorrowedFd<'_>) -> io::Result<libc::tcp_info> {
    // SAFETY: `tcp_info` is a plain C struct of integers: all-zero bytes
    // are a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the descriptor is live for the call (borrowed); the kernel
    // writes at most `len` bytes into `info`, which is that large.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info)
}

/// What one [`recvmsg_into`] returned: payload bytes, the length of the
/// sender address and of the control data the kernel wrote, and whether
/// the payload was cut to the buffer (`MSG_TRUNC`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    pub len: usize,
    pub name_len: usize,
    pub control_len: usize,
    pub truncated: bool,
}

/// `recvmsg(2)` on `sock`: the payload into `buf`, the sender's address
/// into `name` and control data into `control`, in the kernel's layout
/// (read them with `crate::platform::control`).
pub fn recvmsg_into(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    name: &mut [u8],
    control: &mut [u8],
) -> Result<Received, nix::errno::Errno> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data (integers and raw pointers), for which
    // all-zero bytes are valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = name.as_mut_ptr().cast();
    msg.msg_namelen = name.len() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len() as _;
    // SAFETY: the descriptor is live for the call (borrowed); every pointer
    // in `msg` is to a live, exclusively borrowed slice of the length given
    // beside it, which the kernel writes at most.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, 0) };
    if n < 0 {
        return Err(nix::errno::Errno::last());
    }
    Ok(Received {
        len: n as usize,
        name_len: (msg.msg_namelen as usize).min(name.len()),
        control_len: (msg.msg_controllen as usize).min(control.len()),
        truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
    })
}

/// `sendmsg(2)` on `sock`: the bytes of `iov`, gathered, to `dest`, with
/// `control` (`cmsghdr`s in the kernel's layout; empty for none).
pub fn sendmsg_gather(
    sock: BorrowedFd<'_>,
    iov: &[io::IoSlice<'_>],
    control: &[u8],
    dest: &nix::sys::socket::SockaddrStorage,
) -> Result<usize, nix::errno::Errno> {
    use nix::sys::socket::SockaddrLike as _;
    // SAFETY: msghdr is plain data (integers and raw pointers), for which
    // all-zero bytes are valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = dest.as_ptr().cast_mut().cast();
    msg.msg_namelen = dest.len();
    // IoSlice is ABI-compatible with iovec on Unix (std's guarantee); the
    // kernel only reads through these pointers.
    msg.msg_iov = iov.as_ptr().cast_mut().cast();
    msg.msg_iovlen = iov.len() as _;
    if !control.is_empty() {
        msg.msg_control = control.as_ptr().cast_mut().cast();
        msg.msg_controllen = control.len() as _;
    }
    // SAFETY: the descriptor is live for the call (borrowed); `msg` points
    // at the address, the iovecs and the control data, all borrowed for
    // the call with the lengths given beside them, and sendmsg only reads.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, 0) };
    if n < 0 {
        return Err(nix::errno::Errno::last());
    }
    Ok(n as usize)
}

/// Attaches classic BPF program `prog` to the `SO_REUSEPORT` group of
/// `sock`: the kernel then picks each datagram's socket by the program's
/// return value (see `crate::packet::steer`).
pub fn attach_reuseport_cbpf(
    sock: BorrowedFd<'_>,
    prog: &[crate::packet::steer::Insn],
) -> io::Result<()> {
    let mut filter: Vec<libc::sock_filter> = prog
        .iter()
        .map(|i| libc::sock_filter {
            code: i.code,
            jt: i.jt,
            jf: i.jf,
            k: i.k,
        })
        .collect();
    let fprog = libc::sock_fprog {
        len: u16::try_from(filter.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: the descriptor is live for the call (borrowed); `fprog`
    // points to `len` instructions in `filter`, which outlives the call (the
    // kernel copies the program before it returns).
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifname_rules() {
        for ok in ["tun0", "tunfwd%d", "a", "123456789012345"] {
            check_ifname(ok).unwrap();
        }
        for bad in ["", ".", "..", "a/b", "a b", "a:b", "1234567890123456"] {
            assert!(check_ifname(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ifreq_name_roundtrip() {
        assert_eq!(IfReq::new("tun7").unwrap().name(), "tun7");
    }

    #[test]
    fn sockaddr_v4_layout() {
        let sa = sockaddr_v4(Ipv4Addr::new(198, 19, 0, 1));
        assert_eq!(sa.sa_family, libc::AF_INET as libc::sa_family_t);
        let bytes: Vec<u8> = sa.sa_data.iter().map(|&c| c as u8).collect();
        assert_eq!(&bytes[..6], &[0, 0, 198, 19, 0, 1]);
    }
}
