//! Checked views over packet bytes. Nothing here does I/O or allocates.
//!
//! Each view is built by a `new_checked` constructor that validates the bytes
//! once; its accessors are then cheap and cannot read out of bounds. Untrusted
//! input (datagrams from the network) only ever enters through these
//! constructors.

pub mod ip;

pub use ip::{IpPacket, Ipv4Packet, Ipv6Packet, ParseError};
