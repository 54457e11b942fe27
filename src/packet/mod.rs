//! Checked views over packet bytes, checksums, and offload (segmentation and
//! coalescing). Nothing here does I/O.
//!
//! Each view is built by a `new_checked` constructor that validates the bytes
//! once; its accessors are then cheap and cannot read out of bounds. Untrusted
//! input (datagrams from the network) only ever enters through these
//! constructors.

pub mod checksum;
pub mod ecn;
pub mod ip;
pub mod offload;
pub mod steer;
pub mod virtio;
pub mod vxlan;

pub use ip::{IpPacket, Ipv4Packet, Ipv6Packet, ParseError};
