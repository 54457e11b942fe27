//! The virtio-net header a TUN device with `IFF_VNET_HDR` puts before every
//! packet (`struct virtio_net_hdr`, 10 bytes, little-endian fields).
//!
//! It says whether the packet is a GSO super-packet (and how to cut it) and
//! whether its L4 checksum still has to be completed.

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum at `csum_start + csum_offset`
/// holds only the pseudo-header sum; the rest must be added.
pub const F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_F_DATA_VALID`: checksums were already verified.
pub const F_DATA_VALID: u8 = 2;

/// `VIRTIO_NET_HDR_GSO_*` from `uapi/linux/virtio_net.h` (not in libc).
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_UDP: u8 = 3;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_UDP_L4: u8 = 5;
pub const GSO_ECN: u8 = 0x80;

/// Bytes of the header as tunfwd configures it (`TUNSETVNETHDRSZ`).
pub const LEN: usize = 10;

/// A parsed virtio-net header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioNetHdr {
    pub flags: u8,
    pub gso_type: u8,
    /// Length of the headers to copy in front of every segment (a hint; the
    /// splitter computes its own).
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VirtioNetHdr {
    /// Reads the header from the first [`LEN`] bytes; None if too short.
    pub fn parse(bytes: &[u8]) -> Option<VirtioNetHdr> {
        let b = bytes.get(..LEN)?;
        let le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(VirtioNetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
        })
    }

    /// Writes the header into the first [`LEN`] bytes of `out`.
    pub fn write(&self, out: &mut [u8]) {
        out[0] = self.flags;
        out[1] = self.gso_type;
        out[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        out[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        out[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        out[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
    }

    /// The GSO type without the ECN bit.
    pub fn gso_kind(&self) -> u8 {
        self.gso_type & !GSO_ECN
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let h = VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4 | GSO_ECN,
            hdr_len: 52,
            gso_size: 1400,
            csum_start: 20,
            csum_offset: 16,
        };
        let mut b = [0u8; LEN];
        h.write(&mut b);
        assert_eq!(b, [1, 0x81, 52, 0, 0x78, 0x05, 20, 0, 16, 0]);
        assert_eq!(VirtioNetHdr::parse(&b), Some(h));
        assert_eq!(h.gso_kind(), GSO_TCPV4);
        assert_eq!(VirtioNetHdr::parse(&b[..9]), None);
    }
}
