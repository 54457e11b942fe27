//! Addresses: interface addresses with a prefix length ([`Cidr`]), address
//! prefixes ([`Prefix`]) and their netmasks, UDP endpoints as the
//! command line and the peers file spell them, and the canonical form a
//! peer's address is compared in. Pure: no I/O.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

/// `ADDRESS/LENGTH` split and checked: an IPv4 or IPv6 address and a
/// length that fits its family (`example` shows the form in the error).
fn address_and_length(s: &str, example: &str) -> Result<(IpAddr, u8), String> {
    let (addr, len) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not ADDRESS/PREFIX (e.g. {example})"))?;
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not an IPv4 or IPv6 address"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len: u8 = len
        .parse()
        .ok()
        .filter(|&p| p <= max)
        .ok_or_else(|| format!("prefix length {len:?} is not a number from 0 to {max}"))?;
    Ok((addr, len))
}

/// An interface address with prefix length, `198.19.0.1/24` or `2001:db8::1/64`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix_len) = address_and_length(s, "198.19.0.1/24")?;
        if addr.is_unspecified() || addr.is_multicast() {
            return Err(format!("{addr} cannot be an interface address"));
        }
        Ok(Cidr { addr, prefix_len })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// An address prefix that inner source addresses are checked against
/// (`--allow-src`), e.g. `198.19.0.0/24`, `2001:db8::/32`, `0.0.0.0/0`. Host
/// bits are cleared: `198.19.0.7/24` means `198.19.0.0/24`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Prefix {
    net: IpAddr,
    len: u8,
}

impl Prefix {
    /// The prefix of `len` bits at `addr` (host bits cleared); None if
    /// `len` exceeds the family's width.
    pub fn new(addr: IpAddr, len: u8) -> Option<Prefix> {
        let net = match addr {
            IpAddr::V4(a) if len <= 32 => {
                IpAddr::from(std::net::Ipv4Addr::from(u32::from(a) & v4_mask(len)))
            }
            IpAddr::V6(a) if len <= 128 => {
                IpAddr::from(std::net::Ipv6Addr::from(u128::from(a) & v6_mask(len)))
            }
            _ => return None,
        };
        Some(Prefix { net, len })
    }

    /// The network address (host bits clear).
    pub fn net(&self) -> IpAddr {
        self.net
    }

    /// The prefix length in bits.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u8 {
        self.len
    }

    /// True if `addr` is inside the prefix (an IPv4 prefix never contains
    /// an IPv6 address and vice versa).
    pub fn contains(&self, addr: IpAddr) -> bool {
        match (self.net, addr) {
            (IpAddr::V4(n), IpAddr::V4(a)) => u32::from(a) & v4_mask(self.len) == u32::from(n),
            (IpAddr::V6(n), IpAddr::V6(a)) => u128::from(a) & v6_mask(self.len) == u128::from(n),
            _ => false,
        }
    }
}

/// The IPv4 netmask of a prefix length (0 for /0).
pub fn v4_mask(len: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
}

/// The IPv6 netmask of a prefix length (0 for /0).
pub fn v6_mask(len: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
}

impl Prefix {
    /// Like `str::parse`, but a prefix with host bits set is refused (as
    /// `ip route` refuses it): `198.19.0.11/24` is more likely a typo for
    /// `/32` than a way to write `198.19.0.0/24`.
    pub fn parse_exact(s: &str) -> Result<Prefix, String> {
        let p: Prefix = s.parse()?;
        let (addr, len) = s.split_once('/').unwrap_or((s, ""));
        match addr.parse::<IpAddr>() {
            Ok(a) if a != p.net => Err(format!(
                "{s}: host bits set after /{len} (the prefix is {p}; for one address use /{})",
                if a.is_ipv4() { 32 } else { 128 }
            )),
            _ => Ok(p),
        }
    }
}

impl FromStr for Prefix {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, len) = address_and_length(s, "198.19.0.0/24")?;
        Prefix::new(addr, len).ok_or_else(|| format!("{s:?}: prefix length out of range"))
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.len)
    }
}

/// `ADDR:PORT`, or a link-local IPv6 address with its interface by name,
/// `[fe80::2%eth0]:5000`.
pub fn parse_endpoint_with(
    s: &str,
    if_index: impl Fn(&str) -> std::result::Result<u32, String>,
) -> std::result::Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let bad = || format!("{s:?} is not ADDR:PORT (e.g. 198.18.0.1:5000, [2001:db8::1]:5000)");
    let (host, port) = s.rsplit_once("]:").ok_or_else(bad)?;
    let (ip, scope) = host
        .strip_prefix('[')
        .and_then(|h| h.split_once('%'))
        .ok_or_else(bad)?;
    let ip: std::net::Ipv6Addr = ip.parse().map_err(|_| bad())?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let index = if_index(scope).map_err(|e| format!("{s:?}: {e}"))?;
    Ok(SocketAddr::V6(std::net::SocketAddrV6::new(
        ip, port, 0, index,
    )))
}

/// IPv4-mapped IPv6 addresses (what a dual-stack socket reports for an IPv4
/// sender) compare equal to the plain IPv4 address; an IPv6 address keeps
/// its scope (a link-local peer is only itself on its own interface) but
/// not its flow label.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => SocketAddr::V6(std::net::SocketAddrV6::new(
                *v6.ip(),
                v6.port(),
                0,
                v6.scope_id(),
            )),
        },
        v4 => v4,
    }
}
