//! The io_uring engine (Linux): one ring per worker, batched completions, one
//! kernel entry per loop iteration, and no copy on the forwarding path.
//!
//! Each worker owns a buffer pool split into two groups: buffers the TUN
//! queue reads into (and the UDP socket sends from), and buffers the UDP
//! socket receives into (and the TUN queue is written from). A buffer is at
//! any time either free (in a provided-buffer ring or the free list), attached
//! to one in-flight operation, or being looked at between two kernel entries;
//! it returns to its group when the operation that last used it completes.
//!
//! Receive side, best first (probed at start, `--multishot`): multishot reads
//! (`READ_MULTISHOT` on the TUN, 6.7+; multishot `RECVMSG` on UDP, 6.0+) from
//! provided buffer rings, re-armed when a completion lacks the MORE flag; or
//! `--inflight` single-shot reads per descriptor. Writes to the TUN use
//! `WRITE_FIXED` from registered buffers when `--fixed-buffers` allows.
//! Datagrams to the peer go out with `SEND` and a destination address.
//!
//! All `unsafe` of the engine lives in this file: raw buffer memory shared
//! with the kernel, and pushing submission entries whose buffers must outlive
//! the operation. Shutdown cancels every operation and reaps every completion
//! before any buffer memory is freed.
#![allow(unsafe_code)]

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::fs::File;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::{BufRingEntry, CancelBuilder, Fd, Fixed, RecvMsgOut, SubmitArgs, Timespec};
use io_uring::{IoUring, cqueue, opcode, squeue};
use nix::sys::socket::{SockaddrLike, SockaddrStorage};

use crate::config::{Toggle, UringFlags};
use crate::engine::{Shutdown, is_fatal_tun_error, send_addr, tun_failure};
use crate::error::{Error, Result};
use crate::forward::{Decision, DropReason, Forwarder};
use crate::packet::virtio::{self, VirtioNetHdr};
use crate::stats::WorkerStats;

/// The io_uring tuning flags.
#[derive(Clone, Debug)]
pub struct UringOptions {
    /// Submission queue entries (the completion queue gets 4x).
    pub ring_entries: u32,
    /// Buffers per worker (half for each direction; a power of two).
    pub buffers: u32,
    /// Single-shot reads kept outstanding per descriptor (without multishot).
    pub inflight: u32,
    pub multishot: Toggle,
    pub fixed_buffers: Toggle,
    /// Kernel submission-polling thread with this idle time in ms.
    pub sqpoll_idle_ms: Option<u32>,
    pub sqpoll_cpu: Option<u32>,
    /// Never sleep in the kernel: poll the completion queue instead.
    pub busy_poll: bool,
    /// Max packets handled per direction per loop iteration.
    pub batch: usize,
}

/// How a worker's ring wakes up for task work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskRun {
    /// `SINGLE_ISSUER | DEFER_TASKRUN` (6.1+): work runs only when we wait.
    Defer,
    /// `COOP_TASKRUN | TASKRUN_FLAG` (5.19+).
    Coop,
    /// Neither.
    Plain,
}

impl UringOptions {
    /// The options with defaults applied to what was not given.
    /// With `offload_wanted`, buffers hold 64 KiB super-packets, so fewer
    /// are allocated by default (64 instead of 512).
    pub fn from_flags(
        f: &UringFlags,
        batch: usize,
        busy_poll: bool,
        offload_wanted: bool,
    ) -> UringOptions {
        use crate::config::{DEFAULT_BUFFERS, DEFAULT_INFLIGHT, DEFAULT_RING_ENTRIES};
        let buffers = f
            .buffers
            .unwrap_or(if offload_wanted { 64 } else { DEFAULT_BUFFERS });
        UringOptions {
            ring_entries: f.ring_entries.unwrap_or(DEFAULT_RING_ENTRIES),
            buffers,
            inflight: f.inflight.unwrap_or(DEFAULT_INFLIGHT.min(buffers / 2)),
            multishot: f.multishot.unwrap_or(Toggle::Auto),
            fixed_buffers: f.fixed_buffers.unwrap_or(Toggle::Auto),
            sqpoll_idle_ms: f.sqpoll_idle_ms,
            sqpoll_cpu: f.sqpoll_cpu,
            busy_poll,
            batch,
        }
    }
}

/// What the probe decided; every worker builds its ring the same way.
#[derive(Clone, Debug)]
pub struct UringPlan {
    pub opts: UringOptions,
    pub taskrun: TaskRun,
    pub multishot_tun: bool,
    pub multishot_udp: bool,
    pub fixed_buffers: bool,
    /// Bytes per buffer.
    pub buf_len: usize,
    /// TSO/USO super-packets from the TUN device, UDP GSO/GRO, coalesced
    /// TUN writes with virtio-net headers (needs multishot receives).
    pub offload: bool,
}

/// Bytes per buffer: the largest packet plus one (to detect oversize
/// datagrams) plus the multishot recvmsg header and sender address.
pub fn buffer_len(mtu: usize) -> usize {
    (mtu + 1 + RECVMSG_PREFIX).next_multiple_of(64)
}

/// Buffer bytes with offload: a virtio-net header and a 64 KiB super-packet,
/// or a GRO receive of 64 KiB with its recvmsg prefix and control data.
const OFFLOAD_BUF_LEN: usize = 65536 + 256;
/// Room for one super-packet cut into segments (headers repeated).
const SPLIT_LEN: usize = 2 * 65536;
/// Control data we ask multishot recvmsg for: one int (UDP_GRO).
const CMSG_SPACE_INT: usize = 24;
/// Most datagrams and bytes one UDP GSO send may carry.
const GSO_MAX_SEGMENTS: usize = 64;
const GSO_MAX_BYTES: usize = 65507;

/// `struct io_uring_recvmsg_out` (16 bytes) + the sender address we ask for.
const RECVMSG_PREFIX: usize = 16 + SOCKADDR_LEN;
/// Room for a sockaddr_in6.
const SOCKADDR_LEN: usize = std::mem::size_of::<libc::sockaddr_in6>();
/// Completions reaped in one iteration that count as "under load".
const COALESCE_AFTER: usize = 8;
/// Completions to wait for under load...
const COALESCE_WANT: usize = 32;
/// ...but no longer than this.
const COALESCE_WAIT_NS: u32 = 50_000;
const TUN_GROUP: u16 = 0;
const UDP_GROUP: u16 = 1;

fn build_ring(opts: &UringOptions, taskrun: TaskRun) -> io::Result<IoUring> {
    let mut b = IoUring::builder();
    b.setup_cqsize(opts.ring_entries.saturating_mul(4))
        .setup_clamp();
    if let Some(idle) = opts.sqpoll_idle_ms {
        b.setup_sqpoll(idle);
        if let Some(cpu) = opts.sqpoll_cpu {
            b.setup_sqpoll_cpu(cpu);
        }
    }
    match taskrun {
        TaskRun::Defer => {
            b.setup_single_issuer().setup_defer_taskrun();
        }
        TaskRun::Coop => {
            b.setup_coop_taskrun().setup_taskrun_flag();
        }
        TaskRun::Plain => {}
    }
    b.build(opts.ring_entries)
}

/// Probes the running kernel once, before the workers start, and says in one
/// line per missing feature what is used instead. Fails if io_uring itself is
/// unusable or a feature forced `on` is missing.
pub fn probe(opts: &UringOptions, mtu: usize, queues: usize, offload: Toggle) -> Result<UringPlan> {
    if !opts.buffers.is_power_of_two() || !(2..=32768).contains(&opts.buffers) {
        return Err(Error::config(format!(
            "--buffers {} must be a power of two from 2 to 32768",
            opts.buffers
        )));
    }
    // Busy polling and SQPOLL need completions posted without our waiting.
    let mut candidates = vec![TaskRun::Defer, TaskRun::Coop, TaskRun::Plain];
    if opts.busy_poll || opts.sqpoll_idle_ms.is_some() {
        candidates.retain(|t| *t != TaskRun::Defer);
    }
    let mut last_err = None;
    let mut found = None;
    // A small ring answers the feature questions; its memory is released
    // asynchronously after drop, so it must not crowd out the workers' rings.
    let small = UringOptions {
        ring_entries: 8,
        ..opts.clone()
    };
    for t in candidates {
        match build_ring(&small, t) {
            Ok(ring) => {
                found = Some((t, ring));
                break;
            }
            Err(e) => last_err = Some(e),
        }
    }
    let Some((taskrun, ring)) = found else {
        let e = last_err.unwrap_or_else(|| io::Error::from_raw_os_error(libc::ENOSYS));
        return Err(Error::io(
            format!("set up io_uring with {} entries", opts.ring_entries),
            e,
        ));
    };
    if taskrun != TaskRun::Defer && !opts.busy_poll && opts.sqpoll_idle_ms.is_none() {
        crate::info!("io_uring: no DEFER_TASKRUN on this kernel, using {taskrun:?} task work");
    }

    let mut probe = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| Error::io("probe io_uring opcodes", e))?;
    for (code, name) in [
        (opcode::Read::CODE, "READ"),
        (opcode::Write::CODE, "WRITE"),
        (opcode::Send::CODE, "SEND"),
        (opcode::RecvMsg::CODE, "RECVMSG"),
        (opcode::PollAdd::CODE, "POLL_ADD"),
        (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
    ] {
        if !probe.is_supported(code) {
            return Err(Error::config(format!(
                "io_uring on this kernel lacks {name}, which the uring engine needs"
            )));
        }
    }
    // SEND with a destination address (unconnected UDP) and multishot
    // RECVMSG arrived in Linux 6.0, with SEND_ZC: its presence marks 6.0.
    if !probe.is_supported(opcode::SendZc::CODE) {
        return Err(Error::config(
            "io_uring on this kernel predates Linux 6.0 (no SEND with a destination address)",
        ));
    }

    let mut buf_len = buffer_len(mtu);
    let mut plan = UringPlan {
        opts: opts.clone(),
        taskrun,
        multishot_tun: false,
        multishot_udp: false,
        fixed_buffers: false,
        buf_len,
        offload: false,
    };

    // Multishot needs READ_MULTISHOT (6.7) for the TUN; multishot RECVMSG
    // and provided buffer rings (6.0) come with it. Workers still fall back
    // per group if registering a buffer ring fails.
    if opts.multishot != Toggle::Off {
        if probe.is_supported(opcode::ReadMulti::CODE) {
            plan.multishot_tun = true;
            plan.multishot_udp = true;
        } else if opts.multishot == Toggle::On {
            return Err(Error::config(
                "--multishot on: this kernel lacks READ_MULTISHOT (Linux 6.7+)",
            ));
        } else {
            crate::info!(
                "io_uring: no READ_MULTISHOT (Linux 6.7+): single-shot reads, {} in flight per descriptor",
                opts.inflight
            );
        }
    }

    // Offload builds on multishot receives (the GRO size arrives as control
    // data in the provided buffer).
    if offload != Toggle::Off {
        if plan.multishot_tun && plan.multishot_udp {
            plan.offload = true;
            buf_len = OFFLOAD_BUF_LEN;
            plan.buf_len = buf_len;
        } else if offload == Toggle::On {
            return Err(Error::config(
                "--offload on: the uring engine needs multishot receives (Linux 6.7+) for offload",
            ));
        } else {
            crate::info!("offload: the uring engine needs multishot receives for it: off");
        }
    }

    // Ring memory and provided-buffer rings are pinned too: if even those do
    // not fit, io_uring is not usable here.
    let base = ring_bytes(opts).saturating_mul(queues as u64);
    if let Err(why) = memlock_allows(base) {
        return Err(Error::config(format!(
            "io_uring rings need {} KiB of locked memory: {why}",
            base / 1024
        ))
        .with_hint("raise RLIMIT_MEMLOCK (ulimit -l) or lower --ring-entries"));
    }

    // Registered buffers are pinned and count against RLIMIT_MEMLOCK unless
    // the process has CAP_IPC_LOCK. Decided from the limit, not by a trial
    // registration: ring teardown is asynchronous and a trial's accounting
    // would linger into the workers' setup.
    if opts.fixed_buffers != Toggle::Off {
        let need = base + buffer_bytes(opts, buf_len).saturating_mul(queues as u64);
        match memlock_allows(need) {
            Ok(()) => plan.fixed_buffers = true,
            Err(why) if opts.fixed_buffers == Toggle::On => {
                return Err(Error::config(format!(
                    "--fixed-buffers on: {} KiB of registered buffers do not fit: {why}",
                    need / 1024
                ))
                .with_hint(
                    "raise RLIMIT_MEMLOCK (ulimit -l), lower --buffers, or use --fixed-buffers off",
                ));
            }
            Err(why) => crate::info!(
                "io_uring: {} KiB of registered buffers do not fit ({why}): using unregistered buffers",
                need / 1024
            ),
        }
    }
    Ok(plan)
}

fn pages(bytes: u64) -> u64 {
    bytes.next_multiple_of(4096)
}

/// Locked memory one worker's ring needs: submission entries, the
/// completion and submission rings, and two provided-buffer rings.
fn ring_bytes(opts: &UringOptions) -> u64 {
    let sq = u64::from(opts.ring_entries.next_power_of_two());
    let cq = sq * 4;
    let provided = 2 * pages(u64::from(opts.buffers / 2) * 16);
    pages(sq * 64) + pages(64 * 4 + cq * 16 + sq * 4) + provided
}

/// Locked memory one worker's registered buffer pool needs.
fn buffer_bytes(opts: &UringOptions, buf_len: usize) -> u64 {
    pages(u64::from(opts.buffers) * buf_len as u64)
}

/// Ok if `bytes` more may be pinned: CAP_IPC_LOCK, or room under
/// RLIMIT_MEMLOCK. Otherwise the reason.
fn memlock_allows(bytes: u64) -> std::result::Result<(), String> {
    // CAP_IPC_LOCK from linux/capability.h (not in libc).
    const CAP_IPC_LOCK: u32 = 14;
    let cap_ipc_lock = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0);
    if cap_ipc_lock {
        return Ok(());
    }
    match nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_MEMLOCK) {
        Ok((soft, _)) if soft == nix::sys::resource::RLIM_INFINITY || soft >= bytes => Ok(()),
        Ok((soft, _)) => Err(format!("RLIMIT_MEMLOCK is {} KiB", soft / 1024)),
        Err(e) => Err(format!("cannot read RLIMIT_MEMLOCK: {e}")),
    }
}

/// Page-aligned, zeroed memory shared with the kernel. Freed on drop, which
/// the worker only allows once no operation can touch it any more.
struct Region {
    ptr: *mut u8,
    layout: Layout,
}

impl Region {
    fn new(len: usize) -> io::Result<Region> {
        let layout = Layout::from_size_align(len.max(1).next_multiple_of(4096), 4096)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        }
        Ok(Region { ptr, layout })
    }

    fn len(&self) -> usize {
        self.layout.size()
    }

    fn iovec(&self) -> libc::iovec {
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
struct BufRing {
    mem: Region,
    entries: u16,
    /// Our copy of the tail; published to the kernel in `publish`.
    tail: u16,
}

impl BufRing {
    fn new(entries: u32) -> io::Result<BufRing> {
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
    unsafe fn register(&self, ring: &IoUring, group: u16) -> io::Result<()> {
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
    fn push(&mut self, addr: *mut u8, len: usize, bid: u16) {
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
    fn publish(&self) {
        // SAFETY: the tail field overlays entry 0's reserved field, inside
        // `mem`; the kernel reads it with acquire semantics, and it is only
        // written here, through an atomic.
        unsafe {
            let tail = BufRingEntry::tail(self.mem.ptr as *const BufRingEntry) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }
}

/// What an operation is; stored in the upper bits of user_data, the buffer
/// id in the low 16 bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    TunRead = 0,
    UdpRecv = 1,
    UdpSend = 2,
    TunWrite = 3,
    Wake = 4,
    Cancel = 5,
    /// A (GSO) send of part of a cut super-packet.
    GsoSend = 6,
    /// One coalesced TUN write; its index within the buffer's writes is in
    /// bits 16..32 of user_data.
    VnetWrite = 7,
    /// POLLERR on the UDP socket: ICMP errors on its error queue.
    ErrPoll = 8,
}

const OP_SHIFT: u32 = 32;

fn user_data(op: Op, bid: u16) -> u64 {
    ((op as u64) << OP_SHIFT) | u64::from(bid)
}

fn user_data_indexed(op: Op, bid: u16, index: u16) -> u64 {
    user_data(op, bid) | (u64::from(index) << 16)
}

fn decode_index(ud: u64) -> usize {
    usize::from((ud >> 16) as u16)
}

fn decode(ud: u64) -> (Option<Op>, u16) {
    let op = match ud >> OP_SHIFT {
        0 => Some(Op::TunRead),
        1 => Some(Op::UdpRecv),
        2 => Some(Op::UdpSend),
        3 => Some(Op::TunWrite),
        4 => Some(Op::Wake),
        5 => Some(Op::Cancel),
        6 => Some(Op::GsoSend),
        7 => Some(Op::VnetWrite),
        8 => Some(Op::ErrPoll),
        _ => None,
    };
    (op, ud as u16)
}

/// Parses the sender address a recvmsg wrote (sockaddr_in or sockaddr_in6).
pub fn parse_sockaddr(name: &[u8]) -> Option<SocketAddr> {
    if name.len() < 2 {
        return None;
    }
    let family = i32::from(u16::from_ne_bytes([name[0], name[1]]));
    if family == libc::AF_INET && name.len() >= 8 {
        let port = u16::from_be_bytes([name[2], name[3]]);
        let ip = std::net::Ipv4Addr::new(name[4], name[5], name[6], name[7]);
        Some(SocketAddr::from((ip, port)))
    } else if family == libc::AF_INET6 && name.len() >= 28 {
        let port = u16::from_be_bytes([name[2], name[3]]);
        let octets: [u8; 16] = name[8..24].try_into().ok()?;
        let scope = u32::from_ne_bytes(name[24..28].try_into().ok()?);
        let flow = u32::from_be_bytes(name[4..8].try_into().ok()?);
        Some(SocketAddr::V6(std::net::SocketAddrV6::new(
            octets.into(),
            port,
            flow,
            scope,
        )))
    } else {
        None
    }
}

/// The send state of one TUN buffer's cut super-packet (offload): stable
/// structures the in-flight SENDMSG points to.
struct GsoSend {
    msg: libc::msghdr,
    iov: libc::iovec,
    /// One cmsghdr with UDP_SEGMENT, 8-byte aligned.
    cmsg: [u64; 3],
    total: usize,
    sent: usize,
    seg: usize,
    /// Bytes of the send in flight.
    chunk: usize,
}

/// A cmsghdr carrying `UDP_SEGMENT = seg`, laid out in native byte order.
fn udp_segment_cmsg(seg: u16) -> [u64; 3] {
    let mut b = [0u8; 24];
    let hdr_len = std::mem::size_of::<libc::cmsghdr>();
    b[..8].copy_from_slice(&((hdr_len + 2) as u64).to_ne_bytes());
    b[8..12].copy_from_slice(&libc::SOL_UDP.to_ne_bytes());
    b[12..16].copy_from_slice(&libc::UDP_SEGMENT.to_ne_bytes());
    b[16..18].copy_from_slice(&seg.to_ne_bytes());
    let w = |i: usize| u64::from_ne_bytes(b[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
    [w(0), w(1), w(2)]
}

/// The UDP_GRO segment size in recvmsg control data, if present.
pub fn gro_segment(control: &[u8]) -> Option<usize> {
    let mut at = 0;
    while at + 16 <= control.len() {
        let len = usize::try_from(u64::from_ne_bytes(control[at..at + 8].try_into().ok()?)).ok()?;
        let level = i32::from_ne_bytes(control[at + 8..at + 12].try_into().ok()?);
        let kind = i32::from_ne_bytes(control[at + 12..at + 16].try_into().ok()?);
        if len < 16 {
            return None;
        }
        if level == libc::SOL_UDP && kind == libc::UDP_GRO && at + 20 <= control.len() {
            let v = i32::from_ne_bytes(control[at + 16..at + 20].try_into().ok()?);
            return usize::try_from(v).ok().filter(|&v| v > 0);
        }
        at += len.next_multiple_of(8);
    }
    None
}

/// Single-shot recvmsg state of one UDP buffer: stable for the op's lifetime.
struct RecvSlot {
    msg: libc::msghdr,
    iov: libc::iovec,
    name: libc::sockaddr_in6,
}

/// Registered-file slots.
const TUN_SLOT: u32 = 0;
const UDP_SLOT: u32 = 1;

/// Evaluates `$build` with `$f` bound to the worker's TUN or UDP descriptor:
/// the registered slot when files are registered, else the raw fd.
macro_rules! with_file {
    ($w:expr, $slot:expr, |$f:ident| $build:expr) => {
        if $w.files_registered {
            let $f = Fixed($slot);
            $build
        } else {
            let $f = Fd($w.raw_fd($slot));
            $build
        }
    };
}

/// One io_uring worker. Built and run on its own thread (the ring is
/// single-issuer).
pub struct UringWorker {
    // Field order is drop order: the ring goes (after `run` drained it)
    // before the memory it used.
    ring: IoUring,
    tun_ring: Option<BufRing>,
    udp_ring: Option<BufRing>,
    recv_slots: Vec<RecvSlot>,
    /// Offload: per TUN buffer, the cut segments and their send state.
    split_pool: Option<Region>,
    gso_sends: Vec<GsoSend>,
    /// Offload: per UDP buffer, the coalesced TUN writes and how many are
    /// still in flight.
    coalescers: Vec<crate::packet::offload::Coalescer>,
    writes_in_flight: Vec<u32>,
    multishot_msg: Box<libc::msghdr>,
    peer_addr: Box<SockaddrStorage>,
    pool: Region,

    label: String,
    tun: File,
    udp: UdpSocket,
    forwarder: Forwarder,
    plan: UringPlan,
    stats: Arc<WorkerStats>,
    shutdown: Arc<Shutdown>,

    /// Buffers per group.
    per_group: u16,
    /// Packet length held by each buffer (for sends and writes).
    lens: Vec<u32>,
    /// Offset of the packet inside each buffer (recvmsg prefix).
    offsets: Vec<u32>,
    /// Free buffers when not using provided rings.
    free_tun: Vec<u16>,
    free_udp: Vec<u16>,
    /// Reads outstanding (single-shot) or armed (multishot, 0/1).
    tun_reads: u32,
    udp_reads: u32,
    /// A read was refused for lack of buffers; re-arm when one returns.
    tun_starved: bool,
    udp_starved: bool,
    /// Buffers currently in each provided ring (multishot only).
    tun_ring_avail: u32,
    udp_ring_avail: u32,
    /// Operations whose final completion has not arrived.
    in_flight: usize,
    /// Registered file indices, if files are registered.
    files_registered: bool,
    stopping: bool,
    fatal: Option<Error>,
}

impl UringWorker {
    /// Builds the ring, registers files and buffers, and fills the buffer
    /// rings. Must run on the thread that calls [`UringWorker::run`].
    pub fn new(
        label: String,
        tun: File,
        udp: UdpSocket,
        forwarder: Forwarder,
        plan: UringPlan,
        stats: Arc<WorkerStats>,
        shutdown: Arc<Shutdown>,
    ) -> Result<UringWorker> {
        let ring = build_ring(&plan.opts, plan.taskrun)
            .map_err(|e| Error::io(format!("set up io_uring for {label}"), e))?;
        // Cap io-wq: nothing we submit should need it; if something does, it
        // must not grow a thread pool.
        let _ = ring.submitter().register_iowq_max_workers(&mut [1, 1]);
        let files_registered = ring
            .submitter()
            // Slots TUN_SLOT and UDP_SLOT.
            .register_files(&[tun.as_raw_fd(), udp.as_raw_fd()])
            .is_ok();

        let per_group = (plan.opts.buffers / 2) as u16;
        let total = usize::from(per_group) * 2;
        let pool = Region::new(total * plan.buf_len)
            .map_err(|e| Error::io(format!("allocate buffer pool for {label}"), e))?;
        let mut plan = plan;
        if plan.fixed_buffers {
            // SAFETY: the iovec covers `pool`, which is dropped only after the
            // ring (field order) and after `run` reaped every operation.
            let r = unsafe { ring.submitter().register_buffers(&[pool.iovec()]) };
            match r {
                Ok(()) => {}
                Err(e) if plan.opts.fixed_buffers == Toggle::Auto => {
                    crate::info!(
                        "io_uring: {label}: cannot register buffers ({e}): using unregistered buffers"
                    );
                    plan.fixed_buffers = false;
                }
                Err(e) => return Err(Error::io(format!("register buffers for {label}"), e)),
            }
        }

        let peer = send_addr(
            udp.local_addr()
                .map_err(|e| Error::io(format!("query UDP address of {label}"), e))?,
            forwarder.peer(),
        );
        let mut multishot_msg: Box<libc::msghdr> = Box::new(
            // SAFETY: msghdr is plain data (integers and raw pointers), for
            // which all-zero bytes are valid.
            unsafe { std::mem::zeroed() },
        );
        multishot_msg.msg_namelen = SOCKADDR_LEN as u32;
        if plan.offload {
            // The kernel lays the control data out in the provided buffer.
            multishot_msg.msg_controllen = CMSG_SPACE_INT as _;
        }
        let split_pool = if plan.offload {
            Some(
                Region::new(usize::from(per_group) * SPLIT_LEN)
                    .map_err(|e| Error::io(format!("allocate segment buffers for {label}"), e))?,
            )
        } else {
            None
        };
        let gso_sends = if plan.offload {
            (0..per_group)
                .map(|_| GsoSend {
                    // SAFETY: plain C struct: all-zero bytes are valid.
                    msg: unsafe { std::mem::zeroed() },
                    iov: libc::iovec {
                        iov_base: std::ptr::null_mut(),
                        iov_len: 0,
                    },
                    cmsg: [0; 3],
                    total: 0,
                    sent: 0,
                    seg: 1,
                    chunk: 0,
                })
                .collect()
        } else {
            Vec::new()
        };
        let coalescers = if plan.offload {
            (0..per_group)
                .map(|_| crate::packet::offload::Coalescer::new())
                .collect()
        } else {
            Vec::new()
        };

        let mut w = UringWorker {
            ring,
            tun_ring: None,
            udp_ring: None,
            recv_slots: Vec::new(),
            split_pool,
            gso_sends,
            coalescers,
            writes_in_flight: vec![0; usize::from(per_group)],
            multishot_msg,
            peer_addr: Box::new(SockaddrStorage::from(peer)),
            pool,
            label,
            tun,
            udp,
            forwarder,
            stats,
            shutdown,
            per_group,
            lens: vec![0; total],
            offsets: vec![0; total],
            free_tun: Vec::new(),
            free_udp: Vec::new(),
            tun_reads: 0,
            udp_reads: 0,
            tun_starved: false,
            udp_starved: false,
            tun_ring_avail: 0,
            udp_ring_avail: 0,
            in_flight: 0,
            files_registered,
            stopping: false,
            fatal: None,
            plan,
        };
        w.setup_groups()?;
        Ok(w)
    }

    fn buf_ptr(&self, bid: u16) -> *mut u8 {
        // SAFETY: bid < 2 * per_group, so the offset stays inside `pool`.
        unsafe { self.pool.ptr.add(usize::from(bid) * self.plan.buf_len) }
    }

    fn is_tun_buf(&self, bid: u16) -> bool {
        bid < self.per_group
    }

    /// A provided-buffer ring holding buffers `first..first + per_group`,
    /// registered as `group`; None if the kernel refuses and `--multishot`
    /// is auto (the group then uses single-shot reads).
    fn provided_ring(&self, group: u16, first: u16) -> Result<Option<BufRing>> {
        let n = self.per_group;
        let what = if group == TUN_GROUP { "TUN" } else { "UDP" };
        let mut r = BufRing::new(u32::from(n))
            .map_err(|e| Error::io(format!("allocate {what} buffer ring for {}", self.label), e))?;
        for bid in first..first + n {
            let (ptr, len) = self.read_area(bid);
            r.push(ptr, len, bid);
        }
        r.publish();
        // SAFETY: the caller stores the BufRing in `self`, where it is dropped
        // after the ring (field order).
        match unsafe { r.register(&self.ring, group) } {
            Ok(()) => Ok(Some(r)),
            Err(e) if self.plan.opts.multishot == Toggle::Auto => {
                crate::info!(
                    "io_uring: {}: cannot register {what} buffer ring ({e}): single-shot reads",
                    self.label
                );
                Ok(None)
            }
            Err(e) => Err(Error::io(
                format!("register {what} buffer ring for {}", self.label),
                e,
            )),
        }
    }

    fn setup_groups(&mut self) -> Result<()> {
        let n = self.per_group;
        if self.plan.multishot_tun {
            self.tun_ring = self.provided_ring(TUN_GROUP, 0)?;
            self.plan.multishot_tun = self.tun_ring.is_some();
            self.tun_ring_avail = u32::from(n);
        }
        if !self.plan.multishot_tun {
            self.free_tun = (0..n).rev().collect();
        }
        if self.plan.multishot_udp {
            self.udp_ring = self.provided_ring(UDP_GROUP, n)?;
            self.plan.multishot_udp = self.udp_ring.is_some();
            self.udp_ring_avail = u32::from(n);
        }
        if !self.plan.multishot_udp {
            self.free_udp = (n..2 * n).rev().collect();
            // One stable recvmsg header per UDP buffer (never reallocated).
            self.recv_slots = (0..n)
                .map(|_| RecvSlot {
                    // SAFETY: plain C structs: all-zero bytes are valid.
                    msg: unsafe { std::mem::zeroed() },
                    iov: libc::iovec {
                        iov_base: std::ptr::null_mut(),
                        iov_len: 0,
                    },
                    // SAFETY: as above.
                    name: unsafe { std::mem::zeroed() },
                })
                .collect();
        }
        Ok(())
    }

    fn raw_fd(&self, slot: u32) -> RawFd {
        if slot == TUN_SLOT {
            self.tun.as_raw_fd()
        } else {
            self.udp.as_raw_fd()
        }
    }

    /// Pushes one entry, submitting first if the queue is full.
    ///
    /// # Safety
    /// Every buffer and structure `entry` points to must stay valid until the
    /// operation's final completion is reaped.
    unsafe fn push(&mut self, entry: squeue::Entry) -> Result<()> {
        loop {
            let pushed = {
                let mut sq = self.ring.submission();
                // SAFETY: forwarded from the caller.
                unsafe { sq.push(&entry) }.is_ok()
            };
            if pushed {
                self.in_flight += 1;
                return Ok(());
            }
            self.stats.syscalls.add(1);
            self.ring
                .submit()
                .map_err(|e| Error::io(format!("submit to io_uring of {}", self.label), e))?;
        }
    }

    fn arm_tun_reads(&mut self) -> Result<()> {
        if self.stopping {
            return Ok(());
        }
        if self.plan.multishot_tun {
            if self.tun_reads == 0 {
                let e = with_file!(self, TUN_SLOT, |f| opcode::ReadMulti::new(f, 0, TUN_GROUP)
                    .build());
                // SAFETY: buffers come from the registered TUN buffer ring,
                // which outlives every operation.
                unsafe { self.push(e.user_data(user_data(Op::TunRead, 0)))? };
                self.tun_reads = 1;
            }
            return Ok(());
        }
        while self.tun_reads < self.plan.opts.inflight {
            let Some(bid) = self.free_tun.pop() else {
                self.tun_starved = true;
                self.stats.pool_exhausted.add(1);
                break;
            };
            let (ptr, len) = self.read_area(bid);
            let len = len as u32;
            let e = if self.plan.fixed_buffers {
                with_file!(self, TUN_SLOT, |f| opcode::ReadFixed::new(f, ptr, len, 0)
                    .build())
            } else {
                with_file!(self, TUN_SLOT, |f| opcode::Read::new(f, ptr, len).build())
            };
            // SAFETY: buffer `bid` is owned by this operation until its
            // completion; the pool outlives the ring.
            unsafe { self.push(e.user_data(user_data(Op::TunRead, bid)))? };
            self.tun_reads += 1;
        }
        Ok(())
    }

    fn arm_udp_reads(&mut self) -> Result<()> {
        if self.stopping {
            return Ok(());
        }
        if self.plan.multishot_udp {
            if self.udp_reads == 0 {
                let msg = &*self.multishot_msg as *const libc::msghdr;
                let e = with_file!(self, UDP_SLOT, |f| opcode::RecvMsgMulti::new(
                    f, msg, UDP_GROUP
                )
                .build());
                // SAFETY: the msghdr is boxed in self and the buffers come from
                // the registered UDP ring; both outlive every operation.
                unsafe { self.push(e.user_data(user_data(Op::UdpRecv, 0)))? };
                self.udp_reads = 1;
            }
            return Ok(());
        }
        while self.udp_reads < self.plan.opts.inflight {
            let Some(bid) = self.free_udp.pop() else {
                self.udp_starved = true;
                self.stats.pool_exhausted.add(1);
                break;
            };
            let ptr = self.buf_ptr(bid);
            let slot = &mut self.recv_slots[usize::from(bid - self.per_group)];
            slot.iov = libc::iovec {
                iov_base: ptr.cast(),
                iov_len: self.plan.buf_len,
            };
            slot.msg.msg_name = (&mut slot.name as *mut libc::sockaddr_in6).cast();
            slot.msg.msg_namelen = SOCKADDR_LEN as u32;
            slot.msg.msg_iov = &mut slot.iov;
            slot.msg.msg_iovlen = 1;
            let msg = &mut slot.msg as *mut libc::msghdr;
            let e = with_file!(self, UDP_SLOT, |f| opcode::RecvMsg::new(f, msg).build());
            // SAFETY: the slot (in a Vec never resized after setup) and the
            // buffer belong to this operation until its completion.
            unsafe { self.push(e.user_data(user_data(Op::UdpRecv, bid)))? };
            self.udp_reads += 1;
        }
        Ok(())
    }

    /// Waits for POLLERR on the UDP socket (queued ICMP errors).
    fn arm_err_poll(&mut self) -> Result<()> {
        if self.stopping {
            return Ok(());
        }
        let fd = self.udp.as_raw_fd();
        let e = opcode::PollAdd::new(Fd(fd), libc::POLLERR as u32).build();
        // SAFETY: no buffer; the socket is owned by self and outlives the
        // operation (drain reaps every operation before self is dropped).
        unsafe { self.push(e.user_data(user_data(Op::ErrPoll, 0))) }
    }

    fn arm_wake(&mut self) -> Result<()> {
        let fd = self.shutdown.wake_fd().as_raw_fd();
        let e = opcode::PollAdd::new(Fd(fd), libc::POLLIN as u32).build();
        // SAFETY: no buffer; the pipe lives in `shutdown`, held by self.
        unsafe { self.push(e.user_data(user_data(Op::Wake, 0))) }
    }

    /// Returns a buffer to its group, re-arming a starved reader.
    fn recycle(&mut self, bid: u16) -> Result<()> {
        let (ptr, len) = self.read_area(bid);
        if self.is_tun_buf(bid) {
            match &mut self.tun_ring {
                Some(r) => {
                    r.push(ptr, len, bid);
                    r.publish();
                    self.tun_ring_avail += 1;
                }
                None => self.free_tun.push(bid),
            }
            if self.tun_starved {
                self.tun_starved = false;
                self.arm_tun_reads()?;
            }
        } else {
            match &mut self.udp_ring {
                Some(r) => {
                    r.push(ptr, len, bid);
                    r.publish();
                    self.udp_ring_avail += 1;
                }
                None => self.free_udp.push(bid),
            }
            if self.udp_starved {
                self.udp_starved = false;
                self.arm_udp_reads()?;
            }
        }
        Ok(())
    }

    /// Packet bytes held by buffer `bid` at `offset`, `len` long.
    fn packet(&self, bid: u16, offset: usize, len: usize) -> &[u8] {
        // SAFETY: the operation that filled this buffer has completed and no
        // other operation uses it until it is recycled or handed to exactly
        // one send/write; offset + len <= buf_len (checked by callers).
        unsafe { std::slice::from_raw_parts(self.buf_ptr(bid).add(offset), len) }
    }

    fn send_to_peer(&mut self, bid: u16, offset: usize, len: usize) -> Result<()> {
        self.lens[usize::from(bid)] = len as u32;
        self.offsets[usize::from(bid)] = offset as u32;
        // SAFETY: offset + len <= buf_len.
        let ptr = unsafe { self.buf_ptr(bid).add(offset) };
        let dest = self.peer_addr.as_ptr();
        let dest_len = self.peer_addr.len();
        let e = with_file!(self, UDP_SLOT, |f| opcode::Send::new(f, ptr, len as u32)
            .dest_addr(dest)
            .dest_addr_len(dest_len)
            .build());
        // SAFETY: buffer `bid` belongs to this send until its completion; the
        // destination address is boxed in self.
        unsafe { self.push(e.user_data(user_data(Op::UdpSend, bid))) }
    }

    fn write_to_tun(&mut self, bid: u16, offset: usize, len: usize) -> Result<()> {
        self.lens[usize::from(bid)] = len as u32;
        self.offsets[usize::from(bid)] = offset as u32;
        // SAFETY: offset + len <= buf_len.
        let ptr = unsafe { self.buf_ptr(bid).add(offset) };
        let len = len as u32;
        let e = if self.plan.fixed_buffers {
            with_file!(self, TUN_SLOT, |f| opcode::WriteFixed::new(f, ptr, len, 0)
                .build())
        } else {
            with_file!(self, TUN_SLOT, |f| opcode::Write::new(f, ptr, len).build())
        };
        // SAFETY: buffer `bid` belongs to this write until its completion.
        unsafe { self.push(e.user_data(user_data(Op::TunWrite, bid))) }
    }

    /// A packet read from the TUN queue into `bid`.
    /// Offload: the segment buffer of TUN buffer `bid`.
    fn split_ptr(&self, bid: u16) -> Option<*mut u8> {
        let pool = self.split_pool.as_ref()?;
        // SAFETY: bid < per_group, so the offset stays inside the pool.
        Some(unsafe { pool.ptr.add(usize::from(bid) * SPLIT_LEN) })
    }

    /// Offload: a TUN read (virtio-net header + packet) in `bid`: cut it and
    /// start sending the segments.
    fn handle_tun_offload(&mut self, bid: u16, len: usize) -> Result<()> {
        let Some(out_ptr) = self.split_ptr(bid) else {
            return self.recycle(bid);
        };
        // SAFETY: the segment buffer of `bid` is only used by this buffer's
        // sends, none of which is in flight (the buffer was free until this
        // read completed).
        let out = unsafe { std::slice::from_raw_parts_mut(out_ptr, SPLIT_LEN) };
        let frame = self.packet(bid, 0, len);
        let split = VirtioNetHdr::parse(frame)
            .ok_or(crate::packet::offload::OffloadError::Malformed("short"))
            .and_then(|h| {
                crate::packet::offload::split(&h, &frame[virtio::LEN..], self.forwarder.mtu(), out)
            });
        let segs = match split {
            Ok(s) => s,
            Err(_) => {
                self.stats.tun_to_peer.drop(DropReason::BadOffload);
                return self.recycle(bid);
            }
        };
        if segs.count == 1 {
            if let Decision::Drop(r) = self.forwarder.handle_from_tun(&out[..segs.last_len]) {
                self.stats.tun_to_peer.drop(r);
                return self.recycle(bid);
            }
        }
        let g = &mut self.gso_sends[usize::from(bid)];
        g.total = segs.total_len();
        g.sent = 0;
        g.seg = segs.seg_len.max(1);
        self.submit_gso(bid)
    }

    /// Sends the next part of `bid`'s segments: one SENDMSG with UDP_SEGMENT
    /// of up to 64 datagrams, or one plain datagram.
    fn submit_gso(&mut self, bid: u16) -> Result<()> {
        let Some(base) = self.split_ptr(bid) else {
            return self.recycle(bid);
        };
        let peer = self.peer_addr.as_ptr();
        let peer_len = self.peer_addr.len();
        let g = &mut self.gso_sends[usize::from(bid)];
        let per_send = GSO_MAX_SEGMENTS.min(GSO_MAX_BYTES / g.seg).max(1) * g.seg;
        g.chunk = (g.total - g.sent).min(per_send);
        // SAFETY: sent + chunk <= total <= SPLIT_LEN.
        let ptr = unsafe { base.add(g.sent) };
        g.iov = libc::iovec {
            iov_base: ptr.cast(),
            iov_len: g.chunk,
        };
        g.msg.msg_name = peer as *mut libc::c_void;
        g.msg.msg_namelen = peer_len;
        g.msg.msg_iov = &mut g.iov;
        g.msg.msg_iovlen = 1;
        if g.chunk > g.seg {
            g.cmsg = udp_segment_cmsg(g.seg as u16);
            g.msg.msg_control = g.cmsg.as_mut_ptr().cast();
            g.msg.msg_controllen = CMSG_SPACE_INT as _;
        } else {
            g.msg.msg_control = std::ptr::null_mut();
            g.msg.msg_controllen = 0;
        }
        let msg = &g.msg as *const libc::msghdr;
        let e = with_file!(self, UDP_SLOT, |f| opcode::SendMsg::new(f, msg).build());
        // SAFETY: the msghdr, iovec and cmsg live in `gso_sends[bid]` (a Vec
        // never resized after setup), the data in the segment pool and the
        // address in `peer_addr`, all untouched until this send completes.
        unsafe { self.push(e.user_data(user_data(Op::GsoSend, bid))) }
    }

    /// Offload: a GSO send of `bid` completed.
    fn complete_gso(&mut self, bid: u16, res: i32) -> Result<()> {
        let g = &mut self.gso_sends[usize::from(bid)];
        let (chunk, seg) = (g.chunk, g.seg);
        if res >= 0 && res as usize == chunk {
            let count = chunk.div_ceil(seg) as u64;
            if chunk > seg {
                self.stats.gso_sends.add(1);
                self.stats.gso_segments.add(count);
            }
            self.stats.tun_to_peer.packets.add(count);
            self.stats.tun_to_peer.bytes.add(chunk as u64);
            g.sent += chunk;
            if g.sent < g.total && !self.stopping {
                return self.submit_gso(bid);
            }
        } else if res != -libc::ECANCELED {
            let lost = (g.total - g.sent).div_ceil(seg);
            for _ in 0..lost {
                self.stats.tun_to_peer.drop(DropReason::SendFailed);
            }
        }
        self.recycle(bid)
    }

    /// Offload: a (GRO) receive of `plen` payload bytes at `off` in `bid`,
    /// cut every `seg`: checked, coalesced, written to the TUN queue.
    fn handle_gro(
        &mut self,
        bid: u16,
        src: SocketAddr,
        off: usize,
        plen: usize,
        seg: usize,
    ) -> Result<()> {
        if plen == 0 {
            // No chunks to walk: the empty datagram is still counted (as
            // empty from the peer, not_from_peer from a stranger).
            if let Decision::Drop(r) = self.forwarder.handle_from_peer(src, &[]) {
                self.stats.peer_to_tun.drop(r);
            }
            return self.recycle(bid);
        }
        let slot = usize::from(bid - self.per_group);
        let mut c = std::mem::take(&mut self.coalescers[slot]);
        c.clear();
        let seg = seg.max(1);
        if seg < plen {
            self.stats.gro_receives.add(1);
            self.stats.gro_datagrams.add(plen.div_ceil(seg) as u64);
        }
        for chunk in self.packet(bid, off, plen).chunks(seg) {
            match self.forwarder.handle_from_peer(src, chunk) {
                Decision::ToTun => c.push(chunk),
                Decision::Drop(r) => self.stats.peer_to_tun.drop(r),
                Decision::ToPeer => self.stats.peer_to_tun.drop(DropReason::SendFailed),
            }
        }
        let (bytes, writes) = c.finish();
        let ptr = bytes.as_ptr();
        let frames: Vec<(usize, usize)> =
            writes.iter().map(|w| (w.start, w.end - w.start)).collect();
        self.coalescers[slot] = c;
        if frames.is_empty() {
            return self.recycle(bid);
        }
        self.writes_in_flight[slot] = frames.len() as u32;
        for (i, (start, len)) in frames.into_iter().enumerate() {
            // SAFETY: inside the coalescer's output, which is not touched
            // until every write of this buffer completed.
            let p = unsafe { ptr.add(start) };
            let e = with_file!(self, TUN_SLOT, |f| opcode::Write::new(f, p, len as u32)
                .build());
            // SAFETY: as above; the coalescer lives in `self.coalescers`.
            unsafe { self.push(e.user_data(user_data_indexed(Op::VnetWrite, bid, i as u16)))? };
        }
        Ok(())
    }

    /// Offload: coalesced TUN write `index` of `bid` completed.
    fn complete_vnet_write(&mut self, bid: u16, index: usize, res: i32) -> Result<()> {
        let slot = usize::from(bid - self.per_group);
        let (bytes, writes) = self.coalescers[slot].output();
        if let Some(w) = writes.get(index) {
            let frame = &bytes[w.start..w.end];
            if res >= 0 && res as usize == frame.len() {
                let hdr = VirtioNetHdr::parse(frame).unwrap_or_default();
                let extra = (w.packets - 1) * usize::from(hdr.hdr_len);
                self.stats.vnet_writes.add(1);
                self.stats.vnet_write_packets.add(w.packets as u64);
                self.stats.peer_to_tun.packets.add(w.packets as u64);
                self.stats
                    .peer_to_tun
                    .bytes
                    .add((frame.len() - virtio::LEN + extra) as u64);
            } else if res < 0 && is_fatal_tun_error(&io::Error::from_raw_os_error(-res)) {
                self.tun_error("write to", res);
            } else if res != -libc::ECANCELED {
                for _ in 0..w.packets {
                    self.stats.peer_to_tun.drop(DropReason::TunWriteFailed);
                }
            }
        }
        self.writes_in_flight[slot] = self.writes_in_flight[slot].saturating_sub(1);
        if self.writes_in_flight[slot] == 0 {
            self.recycle(bid)?;
        }
        Ok(())
    }

    /// Where reads into buffer `bid` land: TUN buffers keep headroom for
    /// the encapsulation header (VXLAN in TAP mode) in front.
    fn read_area(&self, bid: u16) -> (*mut u8, usize) {
        let head = if self.is_tun_buf(bid) {
            self.forwarder.encap_len()
        } else {
            0
        };
        // SAFETY: head (0 or 8) < buf_len, inside buffer `bid`.
        (
            unsafe { self.buf_ptr(bid).add(head) },
            self.plan.buf_len - head,
        )
    }

    fn handle_tun_packet(&mut self, bid: u16, len: usize) -> Result<()> {
        if self.plan.offload {
            return self.handle_tun_offload(bid, len);
        }
        let head = self.forwarder.encap_len();
        let decision = {
            let ptr = self.buf_ptr(bid);
            // SAFETY: the read that filled buffer `bid` has completed and no
            // other operation uses it until it is handed to exactly one
            // send/write or recycled below; head + len <= buf_len.
            let buf = unsafe { std::slice::from_raw_parts_mut(ptr, head + len) };
            let (encap, pkt) = buf.split_at_mut(head);
            let d = self.forwarder.handle_from_tun_mut(pkt);
            if d == Decision::ToPeer {
                self.forwarder.write_encap(encap);
            }
            d
        };
        match decision {
            Decision::ToPeer => self.send_to_peer(bid, 0, head + len),
            Decision::ToTun => self.write_to_tun(bid, head, len),
            Decision::Drop(r) => {
                self.stats.tun_to_peer.drop(r);
                self.recycle(bid)
            }
        }
    }

    /// A datagram from `src` received into `bid` at `offset`.
    fn handle_datagram(
        &mut self,
        bid: u16,
        src: Option<SocketAddr>,
        offset: usize,
        len: usize,
        truncated: bool,
    ) -> Result<()> {
        let decision = match src {
            None => Decision::Drop(DropReason::NotFromPeer),
            Some(_) if truncated => {
                // Longer than the buffer: certainly over the MTU, unless a
                // stranger sent it.
                if src.is_some_and(|s| self.forwarder.is_peer(s)) {
                    Decision::Drop(DropReason::OverMtu)
                } else {
                    Decision::Drop(DropReason::NotFromPeer)
                }
            }
            Some(src) => self
                .forwarder
                .handle_from_peer(src, self.packet(bid, offset, len)),
        };
        match decision {
            Decision::ToTun => {
                let head = self.forwarder.encap_len();
                self.write_to_tun(bid, offset + head, len - head)
            }
            Decision::ToPeer => self.send_to_peer(bid, offset, len),
            Decision::Drop(r) => {
                self.stats.peer_to_tun.drop(r);
                self.recycle(bid)
            }
        }
    }

    /// Acts on one completion. Returns which input direction it was.
    fn complete(&mut self, ud: u64, res: i32, flags: u32) -> Result<Option<Op>> {
        let (op, bid) = decode(ud);
        let more = cqueue::more(flags);
        if !more {
            self.in_flight = self.in_flight.saturating_sub(1);
        }
        let Some(op) = op else { return Ok(None) };
        match op {
            Op::TunRead => {
                if self.plan.multishot_tun {
                    if !more {
                        self.tun_reads = 0;
                    }
                    if res < 0 {
                        if res == -libc::ENOBUFS {
                            self.stats.pool_exhausted.add(1);
                            // Buffers may have come back earlier in this
                            // batch: starve only if the ring is empty.
                            self.tun_starved = self.tun_ring_avail == 0;
                        } else if res != -libc::EAGAIN
                            && res != -libc::ECANCELED
                            && res != -libc::EINTR
                        {
                            self.tun_error("read from", res);
                        }
                    } else if let Some(bid) = cqueue::buffer_select(flags) {
                        self.tun_ring_avail = self.tun_ring_avail.saturating_sub(1);
                        self.handle_tun_packet(bid, res as usize)?;
                    }
                    if !more && !self.tun_starved {
                        self.arm_tun_reads()?;
                    }
                } else {
                    self.tun_reads -= 1;
                    if res < 0 {
                        self.recycle(bid)?;
                        if res != -libc::EAGAIN && res != -libc::ECANCELED && res != -libc::EINTR {
                            self.tun_error("read from", res);
                        }
                    } else {
                        self.handle_tun_packet(bid, res as usize)?;
                    }
                    self.arm_tun_reads()?;
                }
                Ok(Some(Op::TunRead))
            }
            Op::UdpRecv => {
                if self.plan.multishot_udp {
                    if !more {
                        self.udp_reads = 0;
                    }
                    if res < 0 {
                        if res == -libc::ENOBUFS {
                            self.stats.pool_exhausted.add(1);
                            self.udp_starved = self.udp_ring_avail == 0;
                        } else if res != -libc::ECANCELED {
                            self.stats.io_errors.add(1);
                        }
                    } else if let Some(bid) = cqueue::buffer_select(flags) {
                        self.udp_ring_avail = self.udp_ring_avail.saturating_sub(1);
                        let len = (res as usize).min(self.plan.buf_len);
                        let parsed = {
                            let buf = self.packet(bid, 0, len);
                            RecvMsgOut::parse(buf, &self.multishot_msg).ok().map(|out| {
                                let payload = out.payload_data();
                                let offset = payload.as_ptr() as usize - buf.as_ptr() as usize;
                                (
                                    parse_sockaddr(out.name_data()),
                                    offset,
                                    payload.len(),
                                    out.is_payload_truncated()
                                        || payload.len() + offset >= self.plan.buf_len,
                                    gro_segment(out.control_data()),
                                )
                            })
                        };
                        match parsed {
                            Some((Some(src), off, plen, false, gro)) if self.plan.offload => {
                                self.handle_gro(bid, src, off, plen, gro.unwrap_or(plen))?
                            }
                            Some((src, off, plen, trunc, _)) => {
                                self.handle_datagram(bid, src, off, plen, trunc)?
                            }
                            None => {
                                self.stats.peer_to_tun.drop(DropReason::Truncated);
                                self.recycle(bid)?;
                            }
                        }
                    }
                    if !more && !self.udp_starved {
                        self.arm_udp_reads()?;
                    }
                } else {
                    self.udp_reads -= 1;
                    if res < 0 {
                        if res != -libc::ECANCELED {
                            self.stats.io_errors.add(1);
                        }
                        self.recycle(bid)?;
                    } else {
                        let slot = &self.recv_slots[usize::from(bid - self.per_group)];
                        let name_len = (slot.msg.msg_namelen as usize).min(SOCKADDR_LEN);
                        // SAFETY: `name` is a plain sockaddr_in6 the kernel
                        // filled; viewing its bytes is always valid.
                        let name = unsafe {
                            std::slice::from_raw_parts(
                                (&slot.name as *const libc::sockaddr_in6).cast::<u8>(),
                                name_len,
                            )
                        };
                        let truncated = slot.msg.msg_flags & libc::MSG_TRUNC != 0
                            || res as usize >= self.plan.buf_len;
                        let src = parse_sockaddr(name);
                        let len = (res as usize).min(self.plan.buf_len);
                        self.handle_datagram(bid, src, 0, len, truncated)?;
                    }
                    self.arm_udp_reads()?;
                }
                Ok(Some(Op::UdpRecv))
            }
            Op::UdpSend => {
                let len = self.lens[usize::from(bid)] as usize;
                if res == -libc::EAGAIN {
                    self.stats.tun_to_peer.backpressure.add(1);
                    let off = self.offsets[usize::from(bid)] as usize;
                    return self.send_to_peer(bid, off, len).map(|()| None);
                }
                if res >= 0 && res as usize == len {
                    self.stats.tun_to_peer.delivered(len);
                } else if res != -libc::ECANCELED {
                    self.stats.tun_to_peer.drop(DropReason::SendFailed);
                }
                self.recycle(bid)?;
                Ok(None)
            }
            Op::TunWrite => {
                let len = self.lens[usize::from(bid)] as usize;
                if res == -libc::EAGAIN {
                    self.stats.peer_to_tun.backpressure.add(1);
                    let off = self.offsets[usize::from(bid)] as usize;
                    return self.write_to_tun(bid, off, len).map(|()| None);
                }
                if res >= 0 && res as usize == len {
                    self.stats.peer_to_tun.delivered(len);
                } else if res < 0 && is_fatal_tun_error(&io::Error::from_raw_os_error(-res)) {
                    self.tun_error("write to", res);
                } else if res != -libc::ECANCELED {
                    // A short write or a refused packet: this one is lost.
                    self.stats.peer_to_tun.drop(DropReason::TunWriteFailed);
                }
                self.recycle(bid)?;
                Ok(None)
            }
            Op::GsoSend => self.complete_gso(bid, res).map(|()| None),
            Op::VnetWrite => self
                .complete_vnet_write(bid, decode_index(ud), res)
                .map(|()| None),
            Op::Wake => {
                self.stopping = true;
                Ok(None)
            }
            Op::ErrPoll => {
                if res >= 0 {
                    self.stats
                        .peer_unreachable
                        .add(crate::platform::drain_error_queue(&self.udp));
                }
                if res != -libc::ECANCELED {
                    self.arm_err_poll()?;
                }
                Ok(None)
            }
            Op::Cancel => Ok(None),
        }
    }

    fn tun_error(&mut self, op: &str, res: i32) {
        if self.fatal.is_none() {
            self.fatal = Some(tun_failure(
                op,
                &self.label,
                io::Error::from_raw_os_error(-res),
            ));
        }
        self.stopping = true;
    }

    /// Forwards until shutdown or a fatal device error, then cancels and
    /// reaps every operation.
    pub fn run(mut self) -> Result<()> {
        self.arm_wake()?;
        self.arm_err_poll()?;
        self.arm_tun_reads()?;
        self.arm_udp_reads()?;
        let batch = self.plan.opts.batch;
        let busy = self.plan.opts.busy_poll;
        let mut cqes: Vec<(u64, i32, u32)> = Vec::with_capacity(batch * 2 + 8);
        while !self.stopping && !self.shutdown.is_triggered() {
            // Reap what is there: up to `batch` inputs per direction.
            cqes.clear();
            let mut tun_in = 0;
            let mut udp_in = 0;
            let mut more_waiting = false;
            {
                let mut cq = self.ring.completion();
                cq.sync();
                for cqe in &mut cq {
                    let (op, _) = decode(cqe.user_data());
                    match op {
                        Some(Op::TunRead) => tun_in += 1,
                        Some(Op::UdpRecv) => udp_in += 1,
                        _ => {}
                    }
                    cqes.push((cqe.user_data(), cqe.result(), cqe.flags()));
                    if tun_in >= batch || udp_in >= batch {
                        more_waiting = true;
                        break;
                    }
                }
            }
            for &(ud, res, flags) in &cqes {
                self.complete(ud, res, flags)?;
            }
            if self.stopping {
                break;
            }
            // One kernel entry: submit everything queued, and wait for at
            // least one completion unless some are already waiting.
            let wait = !busy && !more_waiting && self.ring.completion().is_empty();
            // Under load (the last reap was large), wait for a batch of
            // completions for at most COALESCE_WAIT: fewer kernel entries per
            // packet. At low load, wake on the first completion.
            // With offload one completion already stands for up to 64 KiB:
            // waiting for more would only add latency.
            let coalesce = wait && !self.plan.offload && cqes.len() >= COALESCE_AFTER;
            self.stats.syscalls.add(1);
            let r = if coalesce {
                self.stats.waits.add(1);
                let ts = Timespec::new().nsec(COALESCE_WAIT_NS);
                let args = SubmitArgs::new().timespec(&ts);
                self.ring
                    .submitter()
                    .submit_with_args(COALESCE_WANT.min(batch), &args)
            } else if wait {
                self.stats.waits.add(1);
                self.ring.submit_and_wait(1)
            } else {
                self.ring.submit()
            };
            match r {
                Ok(_) => {}
                // The coalescing timeout expired: whatever arrived is reaped.
                Err(e) if e.raw_os_error() == Some(libc::ETIME) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                // Completion queue full: reap first.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => {
                    return Err(Error::io(format!("io_uring_enter for {}", self.label), e));
                }
            }
        }
        self.drain()?;
        // Registered files hold references to the TUN queue and socket, and
        // ring teardown is asynchronous: release them now, so a device we
        // created is gone by the time the process exits.
        if self.files_registered {
            let _ = self.ring.submitter().unregister_files();
        }
        if self.plan.fixed_buffers {
            let _ = self.ring.submitter().unregister_buffers();
        }
        match self.fatal.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Cancels every operation and reaps until none is left, so no buffer is
    /// freed while the kernel may still use it.
    fn drain(&mut self) -> Result<()> {
        self.stopping = true;
        let e = opcode::AsyncCancel2::new(CancelBuilder::any()).build();
        // SAFETY: no buffer involved.
        unsafe { self.push(e.user_data(user_data(Op::Cancel, 0)))? };
        let mut spins = 0u32;
        while self.in_flight > 0 {
            self.stats.syscalls.add(1);
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => {
                    return Err(Error::io(format!("drain io_uring of {}", self.label), e));
                }
            }
            let cqes: Vec<(u64, i32, u32)> = {
                let mut cq = self.ring.completion();
                cq.sync();
                (&mut cq)
                    .map(|c| (c.user_data(), c.result(), c.flags()))
                    .collect()
            };
            for (ud, res, flags) in cqes {
                let (op, _) = decode(ud);
                // Buffers go back (no re-arming while stopping); sends and
                // writes still count what they did.
                let _ = self.complete(ud, res, flags);
                if op == Some(Op::Cancel) && self.in_flight > 0 {
                    // Operations submitted after the cancel (none expected)
                    // get cancelled by a fresh request.
                    spins += 1;
                    if spins < 1000 {
                        let e = opcode::AsyncCancel2::new(CancelBuilder::any()).build();
                        // SAFETY: no buffer involved.
                        unsafe { self.push(e.user_data(user_data(Op::Cancel, 0)))? };
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_roundtrip() {
        for op in [
            Op::TunRead,
            Op::UdpRecv,
            Op::UdpSend,
            Op::TunWrite,
            Op::Wake,
            Op::Cancel,
            Op::GsoSend,
            Op::VnetWrite,
            Op::ErrPoll,
        ] {
            for bid in [0u16, 1, 4095, u16::MAX] {
                assert_eq!(decode(user_data(op, bid)), (Some(op), bid));
            }
        }
        assert_eq!(decode(99 << OP_SHIFT).0, None);
    }

    #[test]
    fn sockaddr_parsing() {
        let v4: SocketAddr = "198.18.0.2:5000".parse().unwrap();
        let s = SockaddrStorage::from(v4);
        // SAFETY: test-only view of a live sockaddr of `len()` bytes.
        let bytes =
            unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), s.len() as usize) };
        assert_eq!(parse_sockaddr(bytes), Some(v4));
        let v6: SocketAddr = "[2001:db8::2]:6000".parse().unwrap();
        let s = SockaddrStorage::from(v6);
        // SAFETY: as above.
        let bytes =
            unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), s.len() as usize) };
        assert_eq!(parse_sockaddr(bytes), Some(v6));
        assert_eq!(parse_sockaddr(&[]), None);
        assert_eq!(parse_sockaddr(&[0, 0, 1, 2]), None);
    }

    #[test]
    fn buffer_len_fits_prefix_and_mtu() {
        let l = buffer_len(1452);
        assert!(l >= 1452 + 1 + RECVMSG_PREFIX);
        assert_eq!(l % 64, 0);
    }
}
