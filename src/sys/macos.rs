//! macOS interface calls: the utun name option and the SIOC* ioctls.
//!
//! `libc` has the structs (`ifreq`, `ifaliasreq`, `sockaddr_in6`) but not the
//! request numbers of `<sys/sockio.h>`; they are computed here with nix's
//! `request_code_*` macros from the same group, number and argument type as
//! the header's `_IOW`/`_IOWR`. `struct in6_aliasreq` (`<netinet6/in6_var.h>`)
//! is not in `libc` and is declared below, its size checked at compile time.
//!
//! Type-checked on Linux for aarch64- and x86_64-apple-darwin; not run in CI.
#![allow(unsafe_code)]

use std::io;
use std::mem::size_of;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, BorrowedFd};

use libc::{c_char, c_int, c_short, c_ulong};

/// `struct in6_aliasreq` from `<netinet6/in6_var.h>`.
#[repr(C)]
struct In6AliasReq {
    ifra_name: [c_char; libc::IFNAMSIZ],
    ifra_addr: libc::sockaddr_in6,
    ifra_dstaddr: libc::sockaddr_in6,
    ifra_prefixmask: libc::sockaddr_in6,
    ifra_flags: c_int,
    ifra_lifetime: libc::in6_addrlifetime,
}

// The sizes the kernel expects (they are part of the request numbers).
const _: () = assert!(size_of::<libc::ifreq>() == 32);
const _: () = assert!(size_of::<libc::ifaliasreq>() == 64);
const _: () = assert!(size_of::<In6AliasReq>() == 128);

// The request encoding (BSD `_IOWR`: direction, size, group, number) checked
// against two numbers `libc` does have, so the computed ones below are built
// the same way.
const _: () = assert!(
    nix::request_code_readwrite!(b'N', 3, size_of::<libc::ctl_info>()) == libc::CTLIOCGINFO
);
const _: () =
    assert!(nix::request_code_readwrite!(b'i', 33, size_of::<libc::ifreq>()) == libc::SIOCGIFADDR);

/// `ND6_INFINITE_LIFETIME`: an address that never expires.
const ND6_INFINITE_LIFETIME: u32 = u32::MAX;

// <sys/sockio.h>
fn siocsifflags() -> c_ulong {
    nix::request_code_write!(b'i', 16, size_of::<libc::ifreq>())
}
fn siocgifflags() -> c_ulong {
    nix::request_code_readwrite!(b'i', 17, size_of::<libc::ifreq>())
}
fn siocaifaddr() -> c_ulong {
    nix::request_code_write!(b'i', 26, size_of::<libc::ifaliasreq>())
}
fn siocsifmtu() -> c_ulong {
    nix::request_code_write!(b'i', 52, size_of::<libc::ifreq>())
}
// <netinet6/in6_var.h>
fn siocaifaddr_in6() -> c_ulong {
    nix::request_code_write!(b'i', 26, size_of::<In6AliasReq>())
}

/// Validates an interface name: `IFNAMSIZ - 1` bytes at most, no NUL.
pub fn check_ifname(name: &str) -> io::Result<()> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.bytes().any(|b| b == 0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "invalid interface name {name:?}: 1 to {} bytes",
                libc::IFNAMSIZ - 1
            ),
        ));
    }
    Ok(())
}

fn copy_name(dst: &mut [c_char; libc::IFNAMSIZ], name: &str) -> io::Result<()> {
    check_ifname(name)?;
    for (d, s) in dst.iter_mut().zip(name.bytes()) {
        *d = s as c_char;
    }
    Ok(())
}

fn check(ret: c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The interface name of a connected utun control socket (`UTUN_OPT_IFNAME`).
pub fn utun_ifname(fd: BorrowedFd<'_>) -> io::Result<String> {
    let mut buf = [0u8; libc::IFNAMSIZ];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: `fd` is live (BorrowedFd); the kernel writes at most `len`
    // bytes to `buf`, which is valid and exclusively borrowed for the call,
    // and stores the written length in `len`.
    let ret = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SYSPROTO_CONTROL,
            libc::UTUN_OPT_IFNAME,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    check(ret)?;
    let bytes = &buf[..(len as usize).min(buf.len())];
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    Ok(String::from_utf8_lossy(&bytes[..end]).into_owned())
}

/// A zeroed `ifreq` naming `name`.
fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    // SAFETY: `ifreq` is a C struct of a char array and a union of integers,
    // sockaddrs and raw pointers; all-zero bytes are valid for each.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    copy_name(&mut ifr.ifr_name, name)?;
    Ok(ifr)
}

fn ifreq_ioctl(sock: BorrowedFd<'_>, request: c_ulong, ifr: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: `sock` is live; every request passed here (SIOCGIFFLAGS,
    // SIOCSIFFLAGS, SIOCSIFMTU) reads or writes exactly one `struct ifreq`,
    // and `ifr` is a valid, exclusively borrowed one.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), request, ifr as *mut libc::ifreq) })
}

/// Sets the MTU of `name` (`SIOCSIFMTU`).
pub fn set_mtu(sock: BorrowedFd<'_>, name: &str, mtu: u32) -> io::Result<()> {
    let mut ifr = ifreq(name)?;
    ifr.ifr_ifru.ifru_mtu = c_int::try_from(mtu).map_err(|_| invalid("MTU too large"))?;
    ifreq_ioctl(sock, siocsifmtu(), &mut ifr)
}

/// Sets `IFF_UP` on `name`, keeping its other flags.
pub fn set_link_up(sock: BorrowedFd<'_>, name: &str) -> io::Result<()> {
    let mut ifr = ifreq(name)?;
    ifreq_ioctl(sock, siocgifflags(), &mut ifr)?;
    // SAFETY: SIOCGIFFLAGS succeeded, so `ifru_flags` holds the flags; any
    // bit pattern is a valid c_short.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags };
    ifr.ifr_ifru.ifru_flags = flags | libc::IFF_UP as c_short;
    ifreq_ioctl(sock, siocsifflags(), &mut ifr)
}

/// A `sockaddr` holding an AF_INET address (port 0): `sockaddr_in` is
/// length, family, 2 bytes port, 4 bytes address, zero padding.
fn sockaddr_v4(addr: Ipv4Addr) -> libc::sockaddr {
    let mut data = [0 as c_char; 14];
    for (d, s) in data[2..6].iter_mut().zip(addr.octets()) {
        *d = s as c_char;
    }
    libc::sockaddr {
        sa_len: size_of::<libc::sockaddr_in>() as u8,
        sa_family: libc::AF_INET as libc::sa_family_t,
        sa_data: data,
    }
}

fn sockaddr_v6(addr: Ipv6Addr) -> libc::sockaddr_in6 {
    // SAFETY: `sockaddr_in6` is plain integers and byte arrays; all-zero is
    // a valid value.
    let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    sa.sin6_len = size_of::<libc::sockaddr_in6>() as u8;
    sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    sa.sin6_addr.s6_addr = addr.octets();
    sa
}

/// Adds an IPv4 address to the point-to-point interface `name`
/// (`SIOCAIFADDR`); the far end is set to the address itself, as utun
/// clients conventionally do.
pub fn add_ipv4_addr(
    sock: BorrowedFd<'_>,
    name: &str,
    addr: Ipv4Addr,
    prefix_len: u8,
) -> io::Result<()> {
    if prefix_len > 32 {
        return Err(invalid("IPv4 prefix length above 32"));
    }
    let mask = crate::types::v4_mask(prefix_len);
    // SAFETY: `ifaliasreq` is a char array and three sockaddrs; all-zero is
    // valid for each.
    let mut req: libc::ifaliasreq = unsafe { std::mem::zeroed() };
    copy_name(&mut req.ifra_name, name)?;
    req.ifra_addr = sockaddr_v4(addr);
    req.ifra_broadaddr = sockaddr_v4(addr);
    req.ifra_mask = sockaddr_v4(Ipv4Addr::from(mask));
    // SAFETY: `sock` is live; SIOCAIFADDR reads one `struct ifaliasreq`,
    // which `req` is, fully initialised.
    check(unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            siocaifaddr(),
            &mut req as *mut libc::ifaliasreq,
        )
    })
}

/// Adds an IPv6 address with an infinite lifetime to `name`
/// (`SIOCAIFADDR_IN6` on an AF_INET6 socket).
pub fn add_ipv6_addr(
    sock6: BorrowedFd<'_>,
    name: &str,
    addr: Ipv6Addr,
    prefix_len: u8,
) -> io::Result<()> {
    if prefix_len > 128 {
        return Err(invalid("IPv6 prefix length above 128"));
    }
    let mask = crate::types::v6_mask(prefix_len);
    // SAFETY: `In6AliasReq` is a char array, sockaddr_in6s, an int and
    // `in6_addrlifetime` (integers); all-zero is valid for each.
    let mut req: In6AliasReq = unsafe { std::mem::zeroed() };
    copy_name(&mut req.ifra_name, name)?;
    req.ifra_addr = sockaddr_v6(addr);
    req.ifra_prefixmask = sockaddr_v6(Ipv6Addr::from(mask));
    req.ifra_lifetime.ia6t_vltime = ND6_INFINITE_LIFETIME;
    req.ifra_lifetime.ia6t_pltime = ND6_INFINITE_LIFETIME;
    // SAFETY: `sock6` is live; SIOCAIFADDR_IN6 reads one `struct
    // in6_aliasreq`, whose layout `In6AliasReq` repeats (size checked above).
    check(unsafe {
        libc::ioctl(
            sock6.as_raw_fd(),
            siocaifaddr_in6(),
            &mut req as *mut In6AliasReq,
        )
    })
}

fn invalid(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}
