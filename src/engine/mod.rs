//! Engines move batches of packets between a TUN queue and a UDP socket.
//!
//! They differ only in how they wait, submit and own buffers; what a packet
//! becomes, what an I/O result means and what is counted is the shared
//! [`crate::datapath`]'s decision, so they behave the same. An engine runs
//! one worker per TUN queue ([`spawn_worker`]) and stops when its
//! [`Shutdown`] fires.

pub mod boost;
#[cfg(target_os = "linux")]
pub mod fake;
pub mod poll;
#[cfg(target_os = "linux")]
pub mod uring;

use std::net::UdpSocket;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use crate::config::{EngineKind, Toggle, TunnelConfig};
use crate::datapath::{Datapath, Framing, Setup};
use crate::device::TunQueue;
use crate::error::{Context, Error, Result};

/// What every worker is made of, whatever the engine.
pub struct WorkerParts {
    /// The TUN queue (nonblocking).
    pub tun: TunQueue,
    /// The UDP socket (nonblocking for poll; io_uring waits itself).
    pub udp: UdpSocket,
    /// The datapath, built by the engine once its buffers exist.
    pub datapath: Setup,
    pub shutdown: Arc<Shutdown>,
    /// Spin instead of sleeping (`--busy-poll`).
    pub busy_poll: bool,
    /// The nice value to sleep at and the packets after a wakeup before
    /// dropping back (`--wake-nice`, `--wake-budget`; None: off).
    pub wake: Option<(i32, u64)>,
    /// How long to keep looking for packets after moving some, yielding
    /// between looks, before sleeping (`--spin`; zero: off).
    pub spin: std::time::Duration,
}

/// What was asked for: the engine flags before probing.
#[derive(Clone, Debug)]
pub struct EngineWanted {
    pub kind: EngineKind,
    pub uring: crate::config::UringFlags,
    pub batch: usize,
    pub busy_poll: bool,
    pub offload: Toggle,
}

impl EngineWanted {
    /// What `cfg` asks for.
    pub fn of(cfg: &TunnelConfig) -> EngineWanted {
        EngineWanted {
            kind: cfg.engine.kind,
            uring: cfg.engine.uring.clone(),
            batch: cfg.engine.batch,
            busy_poll: cfg.engine.busy_poll,
            offload: cfg.effective_offload(),
        }
    }
}

/// The engine every worker runs, as the probe settled it.
#[derive(Clone, Debug)]
pub enum Engine {
    Poll,
    #[cfg(target_os = "linux")]
    Uring(Box<uring::UringPlan>),
}

impl Engine {
    /// Resolves `--engine` for a tunnel: auto takes io_uring when the probe
    /// passes and says so in one line when it does not.
    pub fn choose(cfg: &TunnelConfig) -> Result<Engine> {
        // The way of carrying and the MTU size the buffers.
        let framing = Framing {
            encap: cfg.mode.encap(),
            mtu: cfg.device.mtu as usize,
        };
        Engine::select(&EngineWanted::of(cfg), framing, cfg.engine.queues)
    }

    /// How many of `cfg`'s queues the engine it asks for can run here (at
    /// least 1), and if fewer, why: io_uring's rings must fit the
    /// locked-memory limit (counted for `--engine auto` too, before the
    /// probe says whether io_uring is usable: the count sizes the probe).
    pub fn queues_fit(cfg: &TunnelConfig) -> (usize, Option<String>) {
        let queues = cfg.engine.queues;
        #[cfg(target_os = "linux")]
        if cfg.engine.kind != EngineKind::Poll {
            return uring::queues_fit(&EngineWanted::of(cfg), queues);
        }
        (queues, None)
    }

    /// Resolves an engine request for `queues` workers whose packets are
    /// framed as `framing` (the probe sizes buffers from it).
    pub fn select(want: &EngineWanted, framing: Framing, queues: usize) -> Result<Engine> {
        #[cfg(target_os = "linux")]
        {
            let probe = || uring::probe(want, framing, queues);
            match want.kind {
                EngineKind::Poll => Ok(Engine::Poll),
                EngineKind::Uring => Ok(Engine::Uring(Box::new(probe()?))),
                EngineKind::Auto => match probe() {
                    // Without READ_MULTISHOT (before Linux 6.7) the uring
                    // engine reads one packet per operation and cannot use
                    // offload, which poll can: measured on Debian 12's 6.1,
                    // poll with offload moves 2.4x the TCP of uring without
                    // it and keeps the loaded latency 13x lower (README,
                    // Platforms). Unless io_uring was tuned for explicitly.
                    Ok(plan)
                        if !plan.offload
                            && want.offload != Toggle::Off
                            && !plan.multishot_tun
                            && want.uring.given().is_empty() =>
                    {
                        crate::info!(
                            "io_uring: no READ_MULTISHOT (Linux 6.7+): the uring engine could not use \
                             offload here, the poll engine can: using the poll engine (--engine uring \
                             to run io_uring without offload)"
                        );
                        Ok(Engine::Poll)
                    }
                    Ok(plan) => Ok(Engine::Uring(Box::new(plan))),
                    Err(e) => {
                        crate::info!("io_uring unavailable ({e}): using the poll engine");
                        Ok(Engine::Poll)
                    }
                },
            }
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = (framing, queues);
            match want.kind {
                EngineKind::Uring => Err(Error::config("--engine uring needs Linux")),
                _ => Ok(Engine::Poll),
            }
        }
    }

    /// How long a worker looks for packets after moving some (`--spin`):
    /// `given`, else this engine's default
    /// ([`DEFAULT_SPIN_US_URING`](crate::config::DEFAULT_SPIN_US_URING) with
    /// io_uring, where it was measured to pay; none with poll).
    pub fn spin(&self, given: Option<u64>) -> std::time::Duration {
        let default = match self {
            Engine::Poll => 0,
            #[cfg(target_os = "linux")]
            Engine::Uring(_) => crate::config::DEFAULT_SPIN_US_URING,
        };
        std::time::Duration::from_micros(given.unwrap_or(default))
    }

    /// Whether the workers use offload: asked for (or auto) and, for
    /// io_uring, allowed by the probe (which said why if not).
    pub fn offload_with(&self, wanted: Toggle) -> bool {
        match (wanted, self) {
            (Toggle::Off, _) => false,
            (_, Engine::Poll) => true,
            #[cfg(target_os = "linux")]
            (_, Engine::Uring(plan)) => plan.offload,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Engine::Poll => "poll",
            #[cfg(target_os = "linux")]
            Engine::Uring(_) => "uring",
        }
    }

    /// Whether a tunnel's workers use offload.
    pub fn offload(&self, cfg: &TunnelConfig) -> bool {
        self.offload_with(cfg.effective_offload())
    }

    /// Builds a worker on the calling thread (io_uring rings are
    /// single-issuer) and returns what runs it.
    pub fn build(self, mut parts: WorkerParts) -> Result<Box<dyn FnOnce() -> Result<()>>> {
        parts.datapath = enable_timestamps(&parts.udp, parts.datapath);
        enable_outer_tos(&parts.udp, &parts.datapath);
        Ok(match self {
            Engine::Poll => {
                let w = poll::PollWorker::new(parts)?;
                Box::new(move || w.run())
            }
            #[cfg(target_os = "linux")]
            Engine::Uring(plan) => {
                let w = uring::UringWorker::new(parts, *plan)?;
                Box::new(move || w.run())
            }
        })
    }
}

/// What a worker thread reports to the runtime.
#[derive(Debug)]
pub enum WorkerEvent {
    /// Setup finished: None, or the error that stopped it.
    Ready(Option<Error>),
    /// The worker stopped (its result is the thread's).
    Exited,
}

/// Spawns worker thread `queue`: it pins itself to `cpu` (if any), builds
/// its engine, reports [`WorkerEvent::Ready`], forwards until shutdown and
/// reports [`WorkerEvent::Exited`].
pub fn spawn_worker(
    queue: usize,
    engine: Engine,
    parts: WorkerParts,
    cpu: Option<usize>,
    report: impl Fn(WorkerEvent) + Send + 'static,
) -> Result<JoinHandle<Result<()>>> {
    std::thread::Builder::new()
        .name(format!("tunfwd-q{queue}"))
        .spawn(move || {
            let setup = || -> Result<Box<dyn FnOnce() -> Result<()>>> {
                if let Some(cpu) = cpu {
                    crate::platform::pin_current_thread(cpu)
                        .map_err(|e| {
                            Error::io(format!("pin {} to CPU {cpu}", parts.datapath.label()), e)
                        })
                        .map_err(|e| e.with_hint("is the CPU online and allowed? see --cpus"))?;
                }
                engine.build(parts)
            };
            let result = match setup() {
                Ok(run) => {
                    report(WorkerEvent::Ready(None));
                    run()
                }
                Err(e) => {
                    report(WorkerEvent::Ready(Some(e)));
                    Ok(())
                }
            };
            report(WorkerEvent::Exited);
            result
        })
        .map_err(|e| Error::io(format!("spawn worker thread for queue {queue}"), e))
}

/// A shutdown flag that also wakes sleeping workers: a pipe whose read end
/// every worker polls, and to which `trigger` writes one byte.
#[derive(Debug)]
pub struct Shutdown {
    flag: AtomicBool,
    wake_rx: OwnedFd,
    wake_tx: OwnedFd,
}

impl Shutdown {
    pub fn new() -> Result<Shutdown> {
        let (wake_rx, wake_tx) =
            crate::platform::nonblocking_pipe().context(|| "create shutdown pipe")?;
        Ok(Shutdown {
            flag: AtomicBool::new(false),
            wake_rx,
            wake_tx,
        })
    }

    /// Asks every worker to stop and wakes those asleep. Idempotent.
    pub fn trigger(&self) {
        if !self.flag.swap(true, Ordering::SeqCst) {
            // Nobody reads the pipe: one byte keeps it readable for all
            // pollers (level-triggered). A full pipe is already readable.
            let _ = nix::unistd::write(&self.wake_tx, &[1]);
        }
    }

    pub fn is_triggered(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }

    /// The descriptor that becomes readable on `trigger`.
    pub fn wake_fd(&self) -> BorrowedFd<'_> {
        self.wake_rx.as_fd()
    }
}

/// Now, in ns since the Unix epoch: the datapath's one clock (that of the
/// kernel's receive timestamps, `SO_TIMESTAMPNS`), which engines read and
/// pass to every datapath entry that depends on time.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Turns on the kernel's arrival timestamps on `udp` if the datapath's
/// AQM needs them; if the kernel refuses, the AQM stays off for this worker
/// (one log line).
fn enable_timestamps(udp: &UdpSocket, dp: Setup) -> Setup {
    if !dp.wants_timestamps() {
        return dp;
    }
    match crate::platform::enable_rx_timestamps(udp) {
        Ok(()) => dp,
        Err(e) => {
            crate::info!(
                "{}: no receive timestamps ({e}): queue management off",
                dp.label()
            );
            dp.without_timestamps()
        }
    }
}

/// Asks the kernel for each datagram's outer TOS byte on `udp` if the
/// encapsulation carries ECN; if it refuses (not Linux), congestion marks
/// on the underlay do not reach the packets (one log line) and the worker
/// carries on.
fn enable_outer_tos(udp: &UdpSocket, dp: &Setup) {
    if !dp.wants_outer_tos() {
        return;
    }
    if let Err(e) = crate::platform::enable_rx_tos(udp) {
        crate::info!(
            "{}: the kernel does not report the outer ECN bits ({e}): underlay congestion marks are not carried into packets",
            dp.label()
        );
    }
}

/// Logs what the datapath of a worker has to say (see
/// [`crate::datapath::Event`]); engines call it after each batch.
pub fn log_events(dp: &mut Datapath) {
    while let Some(e) = dp.poll_event() {
        crate::info!("{}: {e}", dp.label());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shutdown_wakes_poll() {
        let s = Shutdown::new().unwrap();
        assert!(!s.is_triggered());
        s.trigger();
        s.trigger();
        assert!(s.is_triggered());
        let mut fds = [nix::poll::PollFd::new(
            s.wake_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let n = nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).unwrap();
        assert_eq!(n, 1);
    }
}
