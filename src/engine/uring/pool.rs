//! Memory shared with the kernel: page-aligned regions, provided-buffer
//! rings, and the ownership of every packet buffer.
//!
//! # Buffer ownership
//! Every buffer is at any time in exactly one state ([`Owner`]):
//! - `Free`: in its direction's provided-buffer ring or free list; the
//!   kernel may fill it (multishot) or a read may be armed on it;
//! - `Kernel`: attached to an operation in flight (a single-shot read, a
//!   send or TUN writes from it); nobody else reads or writes it;
//! - `Engine`: its operation completed and the worker is looking at it
//!   between two kernel entries.
//!
//! Only an `Engine` buffer may be lent to an operation or recycled, only a
//! `Kernel` buffer may come back, only a `Free` buffer may be taken. The
//! worker states each transition ([`Owners::set`]); debug builds check it.
#![allow(unsafe_code)]

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::IoUring;
use io_uring::types::BufRingEntry;

/// Who holds a buffer; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Owner {
    Free,
    Kernel,
    Engine,
}

/// The owner of every buffer of a worker's pool.
pub(super) struct Owners(Vec<Owner>);

impl Owners {
    pub(super) fn new(buffers: usize) -> Owners {
        Owners(vec![Owner::Free; buffers])
    }

    /// Moves buffer `bid` from `from` to `to`; debug builds check that it
    /// was in `from`.
    #[inline]
    pub(super) fn set(&mut self, bid: u16, from: Owner, to: Owner) {
        let o = &mut self.0[usize::from(bid)];
        debug_assert_eq!(*o, from, "buffer {bid}: ownership rule broken");
        *o = to;
    }
}

/// The worker's packet buffers: `count` buffers of `buf_len` bytes in one
/// region shared with the kernel, each with its [`Owner`]. Every pointer
/// handed out is bounds-checked (a compare per call, in every build); the
/// ownership rule is checked in debug builds.
pub(super) struct BufferPool {
    mem: Region,
    buf_len: usize,
    count: usize,
    owners: Owners,
}

impl BufferPool {
    pub(super) fn new(count: usize, buf_len: usize) -> io::Result<BufferPool> {
        let len = count
            .checked_mul(buf_len)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        Ok(BufferPool {
            mem: Region::new(len)?,
            buf_len,
            count,
            owners: Owners::new(count),
        })
    }

    /// The whole pool, for registering it with the ring.
    pub(super) fn iovec(&self) -> libc::iovec {
        self.mem.iovec()
    }

    /// Moves buffer `bid` from `from` to `to` ([`Owners::set`]).
    #[inline]
    pub(super) fn set(&mut self, bid: u16, from: Owner, to: Owner) {
        self.owners.set(bid, from, to);
    }

    /// The bytes `range` of buffer `bid`, as a pointer and a length for an
    /// operation or an iovec. Panics if the range is not inside the buffer.
    #[inline]
    pub(super) fn area(&self, bid: u16, range: std::ops::Range<usize>) -> (*mut u8, usize) {
        assert!(
            usize::from(bid) < self.count && range.start <= range.end && range.end <= self.buf_len,
            "buffer {bid} bytes {range:?}: outside a pool of {} buffers of {} bytes",
            self.count,
            self.buf_len
        );
        let at = usize::from(bid) * self.buf_len + range.start;
        // SAFETY: checked above: `at + range.len()` is within the region of
        // `count * buf_len` bytes.
        (unsafe { self.mem.ptr.add(at) }, range.len())
    }

    /// Buffer `bid`, whole.
    #[inline]
    pub(super) fn whole(&self, bid: u16) -> (*mut u8, usize) {
        self.area(bid, 0..self.buf_len)
    }

    /// Buffer `bid` as a slice of its first `len` bytes (at most the
    /// buffer).
    ///
    /// # Safety
    /// The engine must own the buffer ([`Owner::Engine`]: no operation in
    /// flight uses it), no other slice of it may be alive while this one
    /// is, and the pool must outlive it.
    #[inline]
    pub(super) unsafe fn slice_mut<'a>(&self, bid: u16, len: usize) -> &'a mut [u8] {
        debug_assert_eq!(
            self.owners.0[usize::from(bid)],
            Owner::Engine,
            "buffer {bid} looked at while not the engine's"
        );
        let (ptr, len) = self.area(bid, 0..len.min(self.buf_len));
        // SAFETY: the area is inside the pool; exclusivity and lifetime
        // are the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(ptr, len) }
    }
}

/// Page-aligned, zeroed memory shared with the kernel. Freed on drop, which
/// the worker only allows once no operation can touch it any more.
pub(super) struct Region {
    pub(super) ptr: *mut u8,
    layout: Layout,
}

impl Region {
    pub(super) fn new(len: usize) -> io::Result<Region> {
        let layout = Layout::from_size_align(len.max(1).next_multiple_of(4096), 4096)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        }
        Ok(Region { ptr, layout })
    }

    pub(super) fn len(&self) -> usize {
        self.layout.size()
    }

    pub(super) fn iovec(&self) -> libc::iovec {
        libc::iovec {
            iov_base: self.ptr.cast(),
            iov_len: self.len(),
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `alloc_zeroed` with this same layout.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

/// A provided-buffer ring: `entries` slots the kernel takes buffers from.
pub(super) struct BufRing {
    mem: Region,
    entries: u16,
    /// Our copy of the tail; published to the kernel in `publish`.
    tail: u16,
}

impl BufRing {
    pub(super) fn new(entries: u32) -> io::Result<BufRing> {
        let entries =
            u16::try_from(entries).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let mem = Region::new(usize::from(entries) * std::mem::size_of::<BufRingEntry>())?;
        Ok(BufRing {
            mem,
            entries,
            tail: 0,
        })
    }

    /// # Safety
    /// `self` must stay alive (not moved out of its memory: the Region does
    /// not move) until the group is unregistered or the ring is dropped.
    pub(super) unsafe fn register(&self, ring: &IoUring, group: u16) -> io::Result<()> {
        // SAFETY: the caller keeps the memory alive; it is page-aligned and
        // holds `entries` io_uring_buf slots.
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                self.mem.ptr as u64,
                self.entries,
                group,
                0,
            )
        }
    }

    /// Queues a buffer for the kernel; visible after `publish`.
    pub(super) fn push(&mut self, addr: *mut u8, len: usize, bid: u16) {
        let mask = self.entries - 1;
        let slot = usize::from(self.tail & mask);
        // SAFETY: `slot < entries`, so the entry lies inside `mem`; the kernel
        // only reads slots between its head and the published tail, and this
        // slot is beyond the published tail.
        let entry = unsafe { &mut *(self.mem.ptr as *mut BufRingEntry).add(slot) };
        entry.set_addr(addr as u64);
        entry.set_len(len as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes pushed buffers visible to the kernel (release store of the tail).
    pub(super) fn publish(&self) {
        // SAFETY: the tail field overlays entry 0's reserved field, inside
        // `mem`; the kernel reads it with acquire semantics, and it is only
        // written here, through an atomic.
        unsafe {
            let tail = BufRingEntry::tail(self.mem.ptr as *const BufRingEntry) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }
}
