//! Minimal rtnetlink: create veth pairs and VXLAN devices (RTM_NEWLINK),
//! and ask whether a TUN device is multi-queue (RTM_GETLINK).
//!
//! Only what `tunfwd bench` needs to build its topology without running `ip`,
//! and what the runtime needs to fit `--queues auto` to an existing device.
//! Messages are built by [`Message`] and answers read by [`attrs`] (pure,
//! unit-tested, bounds-checked) and sent on a NETLINK_ROUTE socket of the
//! calling thread's network namespace; the kernel's acknowledgement is checked.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto, socket,
};

use crate::error::{Context, Error, Result};

/// `VETH_INFO_PEER` from `uapi/linux/veth.h` (not in libc).
const VETH_INFO_PEER: u16 = 1;
/// `IFLA_VXLAN_*` from `uapi/linux/if_link.h` (not in libc).
const IFLA_VXLAN_ID: u16 = 1;
const IFLA_VXLAN_GROUP: u16 = 2;
const IFLA_VXLAN_LINK: u16 = 3;
const IFLA_VXLAN_LOCAL: u16 = 4;
const IFLA_VXLAN_PORT: u16 = 15;
/// `IFLA_TUN_MULTI_QUEUE` from `uapi/linux/if_link.h` (not in libc): a u8,
/// 1 for a device made with `IFF_MULTI_QUEUE` (reported since Linux 4.15).
const IFLA_TUN_MULTI_QUEUE: u16 = 7;
/// The attribute type without its NLA_F_NESTED / NLA_F_NET_BYTEORDER bits.
const NLA_TYPE_MASK: u16 = libc::NLA_TYPE_MASK as u16;

const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A netlink message under construction: header, family header, attributes.
#[derive(Debug)]
pub struct Message {
    buf: Vec<u8>,
}

impl Message {
    /// A request of type `ty` with `flags`, sequence number `seq`.
    pub fn new(ty: u16, flags: u16, seq: u32) -> Message {
        let mut buf = vec![0u8; NLMSG_HDRLEN];
        buf[4..6].copy_from_slice(&ty.to_ne_bytes());
        buf[6..8].copy_from_slice(&flags.to_ne_bytes());
        buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        Message { buf }
    }

    /// Appends a `struct ifinfomsg` (family unspecified, index 0: a new link).
    pub fn ifinfomsg(&mut self) -> &mut Self {
        self.buf.extend_from_slice(&[0u8; IFINFOMSG_LEN]);
        self
    }

    /// Appends a `struct ifinfomsg` naming the existing link `ifindex`.
    pub fn ifinfomsg_index(&mut self, ifindex: u32) -> &mut Self {
        let mut m = [0u8; IFINFOMSG_LEN];
        m[4..8].copy_from_slice(&ifindex.to_ne_bytes());
        self.buf.extend_from_slice(&m);
        self
    }

    /// Appends one attribute, padded to 4 bytes.
    pub fn attr(&mut self, ty: u16, data: &[u8]) -> &mut Self {
        let len = 4 + data.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    pub fn attr_str(&mut self, ty: u16, s: &str) -> &mut Self {
        let mut data = s.as_bytes().to_vec();
        data.push(0);
        self.attr(ty, &data)
    }

    pub fn attr_u32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.attr(ty, &v.to_ne_bytes())
    }

    /// Opens a nested attribute; close it with [`Message::end_nest`].
    pub fn begin_nest(&mut self, ty: u16) -> usize {
        let at = self.buf.len();
        self.buf.extend_from_slice(&[0, 0]);
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        at
    }

    pub fn end_nest(&mut self, at: usize) -> &mut Self {
        let len = (self.buf.len() - at) as u16;
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    /// The finished message with its length filled in.
    pub fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// Parses the kernel's answer to a request with NLM_F_ACK: Ok for an error
/// code of 0, the errno otherwise.
pub fn parse_ack(reply: &[u8]) -> io::Result<()> {
    if reply.len() < NLMSG_HDRLEN + 4 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "short netlink reply",
        ));
    }
    let ty = u16::from_ne_bytes([reply[4], reply[5]]);
    if i32::from(ty) != libc::NLMSG_ERROR {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected netlink reply type {ty}"),
        ));
    }
    let code = i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]);
    if code == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(-code))
    }
}

/// The RTM_NEWLINK request that changes the most segments the stack puts in
/// one GSO packet for the device with index `ifindex`.
pub fn gso_max_segs_request(ifindex: u32, max_segs: u32) -> Message {
    let flags = libc::NLM_F_REQUEST | libc::NLM_F_ACK;
    let mut m = Message::new(libc::RTM_NEWLINK, flags as u16, 1);
    m.ifinfomsg_index(ifindex);
    m.attr_u32(libc::IFLA_GSO_MAX_SEGS, max_segs);
    m
}

fn new_link_request() -> Message {
    let flags = libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_EXCL;
    let mut m = Message::new(libc::RTM_NEWLINK, flags as u16, 1);
    m.ifinfomsg();
    m
}

/// The RTM_NEWLINK request for a veth pair: `name` in the socket's
/// namespace, `peer_name` in the namespace `peer_ns`.
pub fn veth_request(name: &str, peer_name: &str, peer_ns: &impl AsFd) -> Message {
    let mut m = new_link_request();
    m.attr_str(libc::IFLA_IFNAME, name);
    let info = m.begin_nest(libc::IFLA_LINKINFO);
    m.attr_str(libc::IFLA_INFO_KIND, "veth");
    let data = m.begin_nest(libc::IFLA_INFO_DATA);
    let peer = m.begin_nest(VETH_INFO_PEER);
    m.ifinfomsg();
    m.attr_str(libc::IFLA_IFNAME, peer_name);
    m.attr_u32(libc::IFLA_NET_NS_FD, peer_ns.as_fd().as_raw_fd() as u32);
    m.end_nest(peer);
    m.end_nest(data);
    m.end_nest(info);
    m
}

/// The RTM_NEWLINK request for a unicast VXLAN device.
pub fn vxlan_request(
    name: &str,
    vni: u32,
    local: Ipv4Addr,
    remote: Ipv4Addr,
    dst_port: u16,
    underlay_ifindex: u32,
) -> Message {
    let mut m = new_link_request();
    m.attr_str(libc::IFLA_IFNAME, name);
    let info = m.begin_nest(libc::IFLA_LINKINFO);
    m.attr_str(libc::IFLA_INFO_KIND, "vxlan");
    let data = m.begin_nest(libc::IFLA_INFO_DATA);
    m.attr_u32(IFLA_VXLAN_ID, vni);
    m.attr(IFLA_VXLAN_GROUP, &remote.octets());
    m.attr(IFLA_VXLAN_LOCAL, &local.octets());
    m.attr_u32(IFLA_VXLAN_LINK, underlay_ifindex);
    m.attr(IFLA_VXLAN_PORT, &dst_port.to_be_bytes());
    m.end_nest(data);
    m.end_nest(info);
    m
}

/// Sends one request on a fresh NETLINK_ROUTE socket in the calling thread's
/// namespace and returns the kernel's first answer.
fn exchange(what: &str, msg: Message) -> Result<Vec<u8>> {
    let sock: OwnedFd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )
    .map_err(io::Error::from)
    .context(|| format!("{what}: open netlink socket"))?;
    let bytes = msg.finish();
    sendto(
        sock.as_fd().as_raw_fd(),
        &bytes,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )
    .map_err(io::Error::from)
    .context(|| format!("{what}: send netlink request"))?;
    let mut reply = vec![0u8; 16384];
    let n = recv(sock.as_fd().as_raw_fd(), &mut reply, MsgFlags::empty())
        .map_err(io::Error::from)
        .context(|| format!("{what}: receive netlink reply"))?;
    reply.truncate(n);
    Ok(reply)
}

/// Sends one request and waits for the acknowledgement.
pub fn request(what: &str, msg: Message) -> Result<()> {
    let reply = exchange(what, msg)?;
    parse_ack(&reply).map_err(|e| Error::io(what.to_string(), e))
}

/// The RTM_GETLINK request for the link called `name`.
pub fn get_link_request(name: &str) -> Message {
    let mut m = Message::new(libc::RTM_GETLINK, libc::NLM_F_REQUEST as u16, 1);
    m.ifinfomsg();
    m.attr_str(libc::IFLA_IFNAME, name);
    m
}

/// The attributes in `buf`, in order: (type without its flag bits, payload).
/// Stops at the first attribute whose length does not fit, so any input is
/// safe to walk.
pub fn attrs(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([rest[0], rest[1]]));
        let ty = u16::from_ne_bytes([rest[2], rest[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > rest.len() {
            return None;
        }
        let payload = &rest[4..len];
        rest = rest.get(align4(len)..).unwrap_or(&[]);
        Some((ty, payload))
    })
}

/// The first attribute of type `ty` in `buf`.
fn attr(buf: &[u8], ty: u16) -> Option<&[u8]> {
    attrs(buf).find(|&(t, _)| t == ty).map(|(_, p)| p)
}

/// Reads the kernel's answer to [`get_link_request`]: whether the link is a
/// TUN/TAP device made with `multi_queue` (`Some(true)`), one made without
/// (`Some(false)`), or not a TUN/TAP device (`None`). An error answer (no
/// such link) is its errno.
pub fn parse_tun_multi_queue(reply: &[u8]) -> io::Result<Option<bool>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    if reply.len() < NLMSG_HDRLEN {
        return Err(bad("short netlink reply"));
    }
    let ty = u16::from_ne_bytes([reply[4], reply[5]]);
    if i32::from(ty) == libc::NLMSG_ERROR {
        parse_ack(reply)?;
        return Err(bad("netlink acknowledged RTM_GETLINK without an answer"));
    }
    if ty != libc::RTM_NEWLINK {
        return Err(bad(&format!("unexpected netlink reply type {ty}")));
    }
    let len = u32::from_ne_bytes([reply[0], reply[1], reply[2], reply[3]]) as usize;
    let body = reply
        .get(NLMSG_HDRLEN + IFINFOMSG_LEN..len.min(reply.len()))
        .ok_or_else(|| bad("short RTM_NEWLINK answer"))?;
    let Some(info) = attr(body, libc::IFLA_LINKINFO) else {
        return Ok(None);
    };
    let kind = attr(info, libc::IFLA_INFO_KIND).unwrap_or_default();
    if kind.split(|&b| b == 0).next() != Some(b"tun".as_slice()) {
        return Ok(None);
    }
    Ok(attr(info, libc::IFLA_INFO_DATA)
        .and_then(|data| attr(data, IFLA_TUN_MULTI_QUEUE))
        .and_then(|v| v.first())
        .map(|&v| v != 0))
}

/// Whether the TUN/TAP device `name` in the calling thread's namespace is
/// multi-queue: `None` if it is not a TUN/TAP device. Needs no privilege
/// and attaches nothing to the device.
pub fn tun_multi_queue(name: &str) -> Result<Option<bool>> {
    let what = format!("ask the kernel about {name} (RTM_GETLINK)");
    let reply = exchange(&what, get_link_request(name))?;
    parse_tun_multi_queue(&reply).map_err(|e| Error::io(what, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_and_nested_lengths_set() {
        let mut m = Message::new(libc::RTM_NEWLINK, 5, 7);
        m.ifinfomsg();
        m.attr_str(libc::IFLA_IFNAME, "ab"); // 4 + 3 -> padded to 8
        let nest = m.begin_nest(libc::IFLA_LINKINFO);
        m.attr_u32(1, 42);
        m.end_nest(nest);
        let b = m.finish();
        assert_eq!(b.len(), 16 + 16 + 8 + 4 + 8);
        assert_eq!(
            u32::from_ne_bytes(b[0..4].try_into().unwrap()) as usize,
            b.len()
        );
        assert_eq!(u16::from_ne_bytes([b[4], b[5]]), libc::RTM_NEWLINK);
        assert_eq!(u32::from_ne_bytes(b[8..12].try_into().unwrap()), 7);
        // IFLA_IFNAME: len 7, then "ab\0" and one pad byte.
        assert_eq!(u16::from_ne_bytes([b[32], b[33]]), 7);
        assert_eq!(&b[36..40], b"ab\0\0");
        // The nest covers its header and the u32 attribute.
        assert_eq!(u16::from_ne_bytes([b[40], b[41]]), 12);
        assert_eq!(u32::from_ne_bytes(b[48..52].try_into().unwrap()), 42);
    }

    #[test]
    fn ack_parsing() {
        let mut reply = vec![0u8; 36];
        reply[4..6].copy_from_slice(&(libc::NLMSG_ERROR as u16).to_ne_bytes());
        parse_ack(&reply).unwrap();
        reply[16..20].copy_from_slice(&(-libc::EEXIST).to_ne_bytes());
        assert_eq!(
            parse_ack(&reply).unwrap_err().raw_os_error(),
            Some(libc::EEXIST)
        );
        assert!(parse_ack(&reply[..10]).is_err());
        reply[4] = 99;
        assert!(parse_ack(&reply).is_err());
    }

    /// An RTM_NEWLINK answer as the kernel gives it for a TUN device
    /// (`kind`, and `multi_queue` if given); nests flagged NLA_F_NESTED.
    fn link_answer(kind: &str, multi_queue: Option<u8>) -> Vec<u8> {
        const NLA_F_NESTED: u16 = libc::NLA_F_NESTED as u16;
        let mut m = Message::new(libc::RTM_NEWLINK, 0, 1);
        m.ifinfomsg_index(5);
        m.attr_str(libc::IFLA_IFNAME, "ptun0");
        m.attr_u32(libc::IFLA_MTU, 1500);
        let info = m.begin_nest(libc::IFLA_LINKINFO | NLA_F_NESTED);
        m.attr_str(libc::IFLA_INFO_KIND, kind);
        let data = m.begin_nest(libc::IFLA_INFO_DATA | NLA_F_NESTED);
        m.attr(3, &[1]); // IFLA_TUN_TYPE: IFF_TUN
        m.attr(6, &[1]); // IFLA_TUN_PERSIST
        if let Some(v) = multi_queue {
            m.attr(IFLA_TUN_MULTI_QUEUE, &[v]);
        }
        m.end_nest(data);
        m.end_nest(info);
        m.finish()
    }

    #[test]
    fn tun_multi_queue_read_from_link_answer() {
        let read = |b: &[u8]| parse_tun_multi_queue(b).unwrap();
        assert_eq!(read(&link_answer("tun", Some(1))), Some(true));
        assert_eq!(read(&link_answer("tun", Some(0))), Some(false));
        // Not a TUN/TAP device, or a kernel that does not say.
        assert_eq!(read(&link_answer("veth", Some(1))), None);
        assert_eq!(read(&link_answer("tunnel", Some(1))), None);
        assert_eq!(read(&link_answer("tun", None)), None);
        let mut plain = Message::new(libc::RTM_NEWLINK, 0, 1);
        plain.ifinfomsg_index(1).attr_str(libc::IFLA_IFNAME, "lo");
        assert_eq!(read(&plain.finish()), None);
        // No such link: the kernel's errno.
        let mut err = vec![0u8; 36];
        err[4..6].copy_from_slice(&(libc::NLMSG_ERROR as u16).to_ne_bytes());
        err[16..20].copy_from_slice(&(-libc::ENODEV).to_ne_bytes());
        assert_eq!(
            parse_tun_multi_queue(&err).unwrap_err().raw_os_error(),
            Some(libc::ENODEV)
        );
        let mut other = link_answer("tun", Some(1));
        other[4..6].copy_from_slice(&libc::RTM_NEWADDR.to_ne_bytes());
        assert!(parse_tun_multi_queue(&other).is_err());
    }

    #[test]
    fn truncated_or_corrupt_answers_never_panic() {
        let good = link_answer("tun", Some(1));
        for n in 0..good.len() {
            let _ = parse_tun_multi_queue(&good[..n]);
            let mut bad = good.clone();
            bad[n] ^= 0xff;
            let _ = parse_tun_multi_queue(&bad);
        }
        // An attribute claiming more than there is ends the walk.
        assert_eq!(attrs(&[200, 0, 1, 0, 9, 9, 9, 9]).count(), 0);
        assert_eq!(attrs(&[2, 0, 1, 0]).count(), 0);
        let two: Vec<_> = attrs(&[5, 0, 1, 0, 7, 0, 0, 0, 4, 0, 2, 0]).collect();
        assert_eq!(two, vec![(1, &[7u8][..]), (2, &[][..])]);
    }
}
