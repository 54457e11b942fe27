//! The io_uring engine (Linux): one ring per worker, batched completions, one
//! kernel entry per loop iteration.
//!
//! What a packet becomes is the shared [`crate::datapath`]'s decision; this
//! engine only decides how to wait and submit, and owns the buffers:
//! - this file: the options, and the probe that decides once, before the
//!   workers start, what the running kernel offers (one log line per missing
//!   feature) and resolves every default;
//! - `pool`: memory shared with the kernel and the buffer-ownership rule;
//! - `ops`: operation tags and the message headers the kernel points to;
//! - `worker`: the ring, the submissions (the `unsafe` pushes), and the
//!   completion loop.
//!
//! Each worker owns a buffer pool split into two groups: buffers the TUN
//! queue reads into (and the UDP socket sends from; with offload, as a
//! gather list with the datagrams' headers in each buffer's split area), and
//! buffers the UDP socket receives into (and the TUN queue
//! is written from, or, with offload, their coalescers' output).
//!
//! Receive side, best first (probed at start, `--multishot`): multishot reads
//! (`READ_MULTISHOT` on the TUN, 6.7+; multishot `RECVMSG` on UDP, 6.0+) from
//! provided buffer rings, re-armed when a completion lacks the MORE flag; or
//! `--inflight` single-shot reads per descriptor. Writes to the TUN use
//! `WRITE_FIXED` from registered buffers when `--fixed-buffers` allows.
//! Datagrams to the peer go out with `SENDMSG` (with `UDP_SEGMENT` for GSO).
//! Shutdown cancels every operation and reaps every completion before any
//! buffer memory is freed.

mod ops;
mod pool;
mod worker;

pub use worker::UringWorker;

use std::io;

use io_uring::{IoUring, opcode};

use super::EngineWanted;
use crate::config::{Toggle, UringSettings};
use crate::datapath::Framing;
use crate::error::{Error, Result};
use ops::RECVMSG_PREFIX;

/// The io_uring settings a worker runs with: the flags with their
/// defaults resolved ([`UringFlags::resolve`](crate::config::UringFlags::resolve),
/// the one place for them), and the engine flags the ring needs.
#[derive(Clone, Debug)]
pub struct UringOptions {
    pub ring: UringSettings,
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
    /// The options of `want`'s flags for workers with (or without)
    /// `offload`.
    pub fn resolve(want: &EngineWanted, offload: bool) -> Result<UringOptions> {
        Ok(UringOptions {
            ring: want.uring.resolve(offload)?,
            busy_poll: want.busy_poll,
            batch: want.batch,
        })
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

/// Bytes per buffer: room for the largest TUN read between its headroom
/// and tail room,
/// and for the largest datagram the peer may send (plus one byte, so an
/// oversize one is told by its length) behind the multishot recvmsg header,
/// the sender's address and the control data.
pub fn buffer_len(framing: Framing, offload: bool) -> usize {
    let read = framing.read_headroom(offload)
        + framing.max_read_len(offload)
        + framing.read_tailroom(offload);
    // Room for every control message a receive may carry.
    let control = crate::platform::control::control_len(true, true);
    let receive = RECVMSG_PREFIX + control + framing.max_receive_len(offload);
    read.max(receive).next_multiple_of(64)
}

const TUN_GROUP: u16 = 0;
const UDP_GROUP: u16 = 1;

fn build_ring(opts: &UringOptions, taskrun: TaskRun) -> io::Result<IoUring> {
    let mut b = IoUring::builder();
    b.setup_cqsize(opts.ring.ring_entries.saturating_mul(4))
        .setup_clamp();
    if let Some(idle) = opts.ring.sqpoll_idle_ms {
        b.setup_sqpoll(idle);
        if let Some(cpu) = opts.ring.sqpoll_cpu {
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
    b.build(opts.ring.ring_entries)
}

/// Probes the running kernel once, before the workers start, and says in one
/// line per missing feature what is used instead. Fails if io_uring itself is
/// unusable or a feature forced `on` is missing.
pub fn probe(want: &EngineWanted, framing: Framing, queues: usize) -> Result<UringPlan> {
    let offload = want.offload;
    // Settled without offload first (the ring's flags do not depend on
    // it), and again once the kernel says whether offload is on.
    let opts = UringOptions::resolve(want, false)?;
    let (taskrun, ring) = first_ring(&opts)?;
    let probe = required_opcodes(&ring)?;
    let mut plan = UringPlan {
        opts: opts.clone(),
        taskrun,
        multishot_tun: false,
        multishot_udp: false,
        fixed_buffers: false,
        buf_len: 0,
        offload: false,
    };
    choose_receives(&opts, &probe, offload, &mut plan)?;

    // Defaults that depend on offload are settled now.
    let opts = UringOptions::resolve(want, plan.offload)?;
    if opts.ring.multishot != Toggle::Off && !plan.multishot_tun {
        crate::info!(
            "io_uring: no READ_MULTISHOT (Linux 6.7+): single-shot reads, {} in flight per descriptor",
            opts.ring.inflight
        );
    }
    plan.opts = opts;
    plan.buf_len = buffer_len(framing, plan.offload);
    plan.fixed_buffers = fixed_buffers_fit(&plan.opts, plan.buf_len, queues)?;
    Ok(plan)
}

/// A small ring with the best task-work mode the kernel takes (it answers
/// the feature questions; its memory is released asynchronously after
/// drop, so it must not crowd out the workers' rings).
fn first_ring(opts: &UringOptions) -> Result<(TaskRun, IoUring)> {
    // Busy polling and SQPOLL need completions posted without our waiting.
    let mut candidates = vec![TaskRun::Defer, TaskRun::Coop, TaskRun::Plain];
    if opts.busy_poll || opts.ring.sqpoll_idle_ms.is_some() {
        candidates.retain(|t| *t != TaskRun::Defer);
    }
    let small = UringOptions {
        ring: UringSettings {
            ring_entries: 8,
            ..opts.ring.clone()
        },
        ..opts.clone()
    };
    let mut last_err = None;
    for t in candidates {
        match build_ring(&small, t) {
            Ok(ring) => {
                if t != TaskRun::Defer && !opts.busy_poll && opts.ring.sqpoll_idle_ms.is_none() {
                    crate::info!(
                        "io_uring: no DEFER_TASKRUN on this kernel, using {t:?} task work"
                    );
                }
                return Ok((t, ring));
            }
            Err(e) => last_err = Some(e),
        }
    }
    let e = last_err.unwrap_or_else(|| io::Error::from_raw_os_error(libc::ENOSYS));
    let refused = matches!(e.raw_os_error(), Some(libc::EPERM | libc::ENOSYS));
    let err = Error::io(
        format!("set up io_uring with {} entries", opts.ring.ring_entries),
        e,
    );
    // Not a missing capability: the kernel (or a sandbox) refuses io_uring
    // itself.
    Err(if refused {
        err.with_hint(
            "io_uring is disabled here: sysctl kernel.io_uring_disabled, or a seccomp or \
             container policy; --engine poll works without it",
        )
    } else {
        err
    })
}

/// The kernel's opcodes, after checking those the engine cannot do without.
fn required_opcodes(ring: &IoUring) -> Result<io_uring::Probe> {
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
    Ok(probe)
}

/// Multishot receives and offload, as the kernel and the flags allow.
fn choose_receives(
    opts: &UringOptions,
    probe: &io_uring::Probe,
    offload: Toggle,
    plan: &mut UringPlan,
) -> Result<()> {
    // Multishot needs READ_MULTISHOT (6.7) for the TUN; multishot RECVMSG
    // and provided buffer rings (6.0) come with it. Workers still fall back
    // per group if registering a buffer ring fails.
    if opts.ring.multishot != Toggle::Off {
        if probe.is_supported(opcode::ReadMulti::CODE) {
            plan.multishot_tun = true;
            plan.multishot_udp = true;
        } else if opts.ring.multishot == Toggle::On {
            return Err(Error::config(
                "--multishot on: this kernel lacks READ_MULTISHOT (Linux 6.7+)",
            ));
        }
    }
    // Offload builds on multishot receives (the GRO size arrives as control
    // data in the provided buffer).
    if offload != Toggle::Off {
        if plan.multishot_tun && plan.multishot_udp {
            plan.offload = true;
        } else if offload == Toggle::On {
            return Err(Error::config(
                "--offload on: the uring engine needs multishot receives (Linux 6.7+) for offload",
            ));
        } else {
            crate::info!("offload: the uring engine needs multishot receives for it: off");
        }
    }
    Ok(())
}

/// How many of `queues` workers' rings fit the locked-memory limit (at
/// least 1: the probe says whether one does), and if fewer than `queues`,
/// why: `--queues auto` takes that many
/// ([`crate::config::EngineConfig::queues_auto`]). Sized for the larger
/// of the rings with and without offload (settled only by the probe,
/// which needs the count), plus one ring: the probe's, whose accounting
/// ends asynchronously after it closes, and the kernel's own rounding
/// (measured here: two queues needed 97-112 KiB against 88 estimated).
pub fn queues_fit(want: &EngineWanted, queues: usize) -> (usize, Option<String>) {
    let per_ring = [false, true]
        .iter()
        .filter_map(|&offload| UringOptions::resolve(want, offload).ok())
        .map(|o| ring_bytes(&o))
        .max()
        .unwrap_or(0);
    let need = |n: usize| per_ring.saturating_mul(n as u64 + 1);
    let fits = |n: usize| memlock_allows(need(n));
    match fits(queues) {
        Ok(()) => (queues, None),
        Err(why) => {
            let n = (1..queues).rev().find(|&n| fits(n).is_ok()).unwrap_or(1);
            let need = need(queues) / 1024;
            (
                n,
                Some(format!(
                    "io_uring rings for {queues} queues need about {need} KiB of locked memory ({why})"
                )),
            )
        }
    }
}

/// Whether registered buffers fit the locked-memory limit (after the rings
/// themselves, which must).
fn fixed_buffers_fit(opts: &UringOptions, buf_len: usize, queues: usize) -> Result<bool> {
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
    if opts.ring.fixed_buffers == Toggle::Off {
        return Ok(false);
    }
    let need = base + buffer_bytes(opts, buf_len).saturating_mul(queues as u64);
    match memlock_allows(need) {
        Ok(()) => Ok(true),
        Err(why) if opts.ring.fixed_buffers == Toggle::On => Err(Error::config(format!(
            "--fixed-buffers on: {} KiB of registered buffers do not fit: {why}",
            need / 1024
        ))
        .with_hint(
            "raise RLIMIT_MEMLOCK (ulimit -l), lower --buffers, or use --fixed-buffers off",
        )),
        Err(why) => {
            crate::info!(
                "io_uring: {} KiB of registered buffers do not fit ({why}): using unregistered buffers",
                need / 1024
            );
            Ok(false)
        }
    }
}

fn pages(bytes: u64) -> u64 {
    bytes.next_multiple_of(4096)
}

/// Locked memory one worker's ring needs: submission entries, the
/// completion and submission rings, and two provided-buffer rings.
fn ring_bytes(opts: &UringOptions) -> u64 {
    let sq = u64::from(opts.ring.ring_entries.next_power_of_two());
    let cq = sq * 4;
    let provided = 2 * pages(u64::from(opts.ring.buffers / 2) * 16);
    pages(sq * 64) + pages(64 * 4 + cq * 16 + sq * 4) + provided
}

/// Locked memory one worker's registered buffer pool needs.
fn buffer_bytes(opts: &UringOptions, buf_len: usize) -> u64 {
    pages(u64::from(opts.ring.buffers) * buf_len as u64)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UringFlags;
    use crate::forward::Forwarder;
    use crate::platform::control::CMSG_SPACE_INT;

    fn resolved(
        buffers: Option<u32>,
        inflight: Option<u32>,
        offload: bool,
    ) -> Result<UringOptions> {
        let want = EngineWanted {
            kind: crate::config::EngineKind::Uring,
            uring: UringFlags {
                buffers,
                inflight,
                ..UringFlags::default()
            },
            batch: 64,
            busy_poll: false,
            offload: Toggle::Auto,
        };
        UringOptions::resolve(&want, offload)
    }

    #[test]
    fn defaults_are_resolved_from_what_the_probe_decided() {
        let o = resolved(None, None, true).unwrap();
        assert_eq!(
            (o.ring.buffers, o.ring.inflight, o.ring.ring_entries),
            (64, 2, 256)
        );
        let o = resolved(None, None, false).unwrap();
        assert_eq!((o.ring.buffers, o.ring.inflight), (512, 2));
        // Given values stand; a pool of 2 gets 1 read in flight.
        let o = resolved(Some(2), None, true).unwrap();
        assert_eq!((o.ring.buffers, o.ring.inflight), (2, 1));
        // --inflight beyond half of the (default) pool is refused.
        let e = resolved(None, Some(100), true).unwrap_err().to_string();
        assert!(e.contains("--inflight 100"), "{e}");
        assert!(e.contains("the default with offload"), "{e}");
        assert!(resolved(None, Some(100), false).is_ok());
        let e = resolved(Some(3), None, false).unwrap_err().to_string();
        assert!(e.contains("--buffers 3 must be a power of two"), "{e}");
    }

    #[test]
    fn buffers_hold_the_largest_datagram_of_every_mode_and_mtu() {
        let peer = "198.18.0.2:4789".parse().unwrap();
        for mtu in [68usize, 1280, 1420, 1450, 1472, 1500, 9000, 65507] {
            for fwd in [Forwarder::new(mtu, peer), Forwarder::vxlan(mtu, peer, 42)] {
                let len = buffer_len(Framing::of(&fwd), false);
                assert_eq!(len % 64, 0);
                // A multishot receive: header, address, then the payload,
                // which must hold the largest datagram and one byte more.
                assert!(len > RECVMSG_PREFIX + fwd.max_datagram_len(), "{mtu}");
                // A TUN read behind the encapsulation headroom.
                assert!(len >= fwd.encap_len() + fwd.max_frame_len(), "{mtu}");
            }
        }
        let fwd = Forwarder::new(1500, peer);
        assert!(buffer_len(Framing::of(&fwd), true) >= RECVMSG_PREFIX + CMSG_SPACE_INT + 65536);
    }
}
