//! The bench topology (README, "Benchmarks"), built from Rust: two anonymous
//! namespaces joined by a veth pair, optionally a kernel VXLAN tunnel over it.
//! Everything vanishes with the namespaces when the bench exits, however it
//! exits.

use std::net::{IpAddr, Ipv4Addr};

use crate::device::{configure_link, interface_index};
use crate::error::Result;
use crate::netlink;
use crate::netns::NetNs;
use crate::types::Cidr;

pub const UNDERLAY_A: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const UNDERLAY_B: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// tunfwd's overlay.
pub const TUN_A: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
pub const TUN_B: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 2);
/// The kernel VXLAN baseline's overlay.
pub const VXLAN_A: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 1);
pub const VXLAN_B: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 2);
pub const VXLAN_VNI: u32 = 42;
pub const VXLAN_PORT: u16 = 4789;
/// 1500-byte underlay minus outer IPv4 (20), UDP (8), VXLAN (8), Ethernet (14).
pub const VXLAN_MTU: u32 = 1450;

fn cidr(addr: Ipv4Addr, prefix_len: u8) -> Cidr {
    Cidr {
        addr: IpAddr::V4(addr),
        prefix_len,
    }
}

/// Host a and host b.
#[derive(Debug)]
pub struct Topology {
    pub a: NetNs,
    pub b: NetNs,
}

impl Topology {
    /// Two namespaces with `lo` up and `veth0` addressed 198.18.0.1/30 and
    /// 198.18.0.2/30.
    pub fn new() -> Result<Topology> {
        let a = NetNs::new()?;
        let b = NetNs::new()?;
        let b_handle = b.try_clone()?;
        a.run(move || {
            netlink::request(
                "create veth pair veth0/veth0",
                netlink::veth_request("veth0", "veth0", &b_handle),
            )?;
            configure_link("lo", None, &[], None)?;
            configure_link("veth0", None, &[cidr(UNDERLAY_A, 30)], None)
        })?;
        b.run(|| {
            configure_link("lo", None, &[], None)?;
            configure_link("veth0", None, &[cidr(UNDERLAY_B, 30)], None)
        })?;
        Ok(Topology { a, b })
    }

    /// Turns on ECN for TCP (`net.ipv4.tcp_ecn=1`: request it on outgoing
    /// connections, accept it on incoming ones) in both namespaces.
    pub fn enable_tcp_ecn(&self) -> Result<()> {
        for ns in [&self.a, &self.b] {
            // A thread inside the namespace opens the namespace's own sysctl.
            ns.run(|| {
                std::fs::write("/proc/sys/net/ipv4/tcp_ecn", "1")
                    .map_err(|e| crate::error::Error::io("set net.ipv4.tcp_ecn=1", e))
            })?;
        }
        Ok(())
    }

    /// Adds `vxlan0` (VNI 42, UDP 4789) on both sides: 198.19.1.1/24 - .2/24.
    pub fn add_vxlan(&self) -> Result<()> {
        for (ns, local, remote, addr) in [
            (&self.a, UNDERLAY_A, UNDERLAY_B, VXLAN_A),
            (&self.b, UNDERLAY_B, UNDERLAY_A, VXLAN_B),
        ] {
            ns.run(move || {
                let underlay = interface_index("veth0")?;
                netlink::request(
                    "create vxlan0",
                    netlink::vxlan_request(
                        "vxlan0", VXLAN_VNI, local, remote, VXLAN_PORT, underlay,
                    ),
                )?;
                configure_link("vxlan0", Some(VXLAN_MTU), &[cidr(addr, 24)], None)
            })?;
        }
        Ok(())
    }
}
