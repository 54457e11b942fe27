//! VXLAN (RFC 7348): an 8-byte header in front of an Ethernet frame, carried
//! in UDP (port 4789). Flags byte 0x08 (I: VNI valid), 24-bit VNI.

/// Bytes of the VXLAN header.
pub const HEADER_LEN: usize = 8;
/// Smallest Ethernet frame we accept (header only: dst, src, ethertype).
pub const ETH_HEADER_LEN: usize = 14;
/// The I flag: the VNI field is valid.
const FLAG_I: u8 = 0x08;
/// Largest VNI (24 bits).
pub const MAX_VNI: u32 = (1 << 24) - 1;

/// Why a datagram is not a VXLAN frame for us.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VxlanError {
    /// Shorter than the VXLAN header plus an Ethernet header.
    Truncated,
    /// The I flag is not set.
    BadFlags,
    /// Another VXLAN network.
    WrongVni,
}

/// Writes the header for `vni` into `out[..8]` (reserved fields zero).
pub fn write_header(out: &mut [u8], vni: u32) {
    out[..HEADER_LEN].copy_from_slice(&[0; HEADER_LEN]);
    out[0] = FLAG_I;
    out[4..7].copy_from_slice(&vni.to_be_bytes()[1..4]);
}

/// Checks a received datagram; on success the frame is `datagram[8..]`.
/// Reserved bits are ignored on receipt, as RFC 7348 asks.
pub fn check(datagram: &[u8], vni: u32) -> Result<(), VxlanError> {
    if datagram.len() < HEADER_LEN + ETH_HEADER_LEN {
        return Err(VxlanError::Truncated);
    }
    if datagram[0] & FLAG_I == 0 {
        return Err(VxlanError::BadFlags);
    }
    let got = u32::from_be_bytes([0, datagram[4], datagram[5], datagram[6]]);
    if got != vni {
        return Err(VxlanError::WrongVni);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrip_and_checks() {
        let mut d = vec![0u8; HEADER_LEN + 60];
        write_header(&mut d, 0x00ab_cdef);
        assert_eq!(&d[..8], &[0x08, 0, 0, 0, 0xab, 0xcd, 0xef, 0]);
        assert_eq!(check(&d, 0xab_cdef), Ok(()));
        assert_eq!(check(&d, 42), Err(VxlanError::WrongVni));
        assert_eq!(check(&d[..21], 0xab_cdef), Err(VxlanError::Truncated));
        d[0] = 0;
        assert_eq!(check(&d, 0xab_cdef), Err(VxlanError::BadFlags));
        // Reserved bits set by a sender are ignored.
        d[0] = 0xff;
        d[7] = 0xff;
        assert_eq!(check(&d, 0xab_cdef), Ok(()));
    }
}
