//! The bottom layer: plain domain types that every other layer may use and
//! that import nothing of the crate's own (addresses and prefixes, the
//! user to run as, the reasons a packet is dropped). No I/O.

pub mod addr;
pub mod drop;
pub mod user;

pub use addr::{Cidr, Prefix, canonical, v4_mask, v6_mask};
pub use drop::DropReason;
pub use user::UserSpec;
