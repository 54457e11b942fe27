//! The WireGuard userspace API's server: a UNIX socket per interface at
//! `/var/run/wireguard/IFACE.sock` (directory 0755, socket 0700, as
//! wireguard-go makes them), where `wg` gets the interface's state and
//! sets it. Each connection is served on its own thread (at most
//! [`MAX_CONNECTIONS`] at once: a new one closes the oldest), with a read
//! timeout and a cap on a request's size, so a client that sends garbage,
//! never finishes, or sends too much changes nothing and holds nothing
//! for long. Requests are parsed and checked by [`crate::wg::uapi`];
//! applying one is [`super::wg::publish`]'s.

use std::io::{BufRead, BufReader, Read as _, Write as _};
use std::net::UdpSocket;
use std::os::fd::AsRawFd as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::peers::SharedPeers;
use crate::wg::uapi::{self, PeerReport, Refused};
use crate::wg::{Device, WgConf};

/// Where `wg` looks for userspace interfaces.
pub const SOCKET_DIR: &str = "/var/run/wireguard";
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// How long a connection may take to send the rest of a request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What the server reads and changes: the configuration as `wg` last set
/// it, the device and the table its peers are published with.
pub(super) struct State {
    pub(super) dev: Arc<Device>,
    pub(super) shared: Arc<SharedPeers>,
    pub(super) workers: usize,
    /// The workers' sockets (duplicates), for `fwmark`.
    pub(super) sockets: Mutex<Vec<UdpSocket>>,
    /// The control thread's (a duplicate of the first).
    pub(super) control: Arc<Mutex<UdpSocket>>,
    /// The port they are bound to.
    pub(super) port: Mutex<u16>,
    pub(super) conf: Mutex<WgConf>,
    /// Where a new port goes: the runtime restarts the workers on it.
    pub(super) events: crossbeam::channel::Sender<super::Event>,
}

impl State {
    /// The answer to `get=1`.
    fn get(&self) -> String {
        let conf = self.conf.lock().unwrap_or_else(|e| e.into_inner());
        let (_, table) = self.shared.load();
        let set = self.dev.current();
        let now = crate::engine::now_ns();
        let reports: Vec<PeerReport> = conf
            .peers
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let facts = set
                    .find(&p.public_key)
                    .map(|id| set.facts(id))
                    .unwrap_or_default();
                let counts = if i < table.len() {
                    table.peer(i as u32).stats.snapshot()
                } else {
                    Default::default()
                };
                PeerReport {
                    endpoint: facts.endpoint,
                    last_handshake_ns: facts
                        .since_handshake
                        .map(|d| now.saturating_sub(d.as_nanos() as u64))
                        .unwrap_or(0),
                    rx_bytes: counts.rx_bytes,
                    tx_bytes: counts.tx_bytes,
                }
            })
            .collect();
        let port = *self.port.lock().unwrap_or_else(|e| e.into_inner());
        uapi::format_get(&conf, port, &reports)
    }

    /// Carries out a `set` whose lines are `lines`: all of it, or (an
    /// error) nothing.
    fn set(&self, lines: &[&str]) -> std::result::Result<(), Refused> {
        let mut conf = self.conf.lock().unwrap_or_else(|e| e.into_inner());
        let change = uapi::apply_set(&conf, lines)?;
        // The peers must make a table before anything changes.
        super::wg::table_for(&change.conf, self.workers, None).map_err(|why| Refused {
            errno: uapi::EINVAL,
            why,
        })?;
        let port = *self.port.lock().unwrap_or_else(|e| e.into_inner());
        let mut mark = change.fwmark;
        if let Some(p) = change.listen_port.filter(|&p| p != port) {
            self.rebind(p)?;
            // The new sockets carry the mark in force.
            mark = mark.or(change.conf.fwmark);
        }
        if let Some(m) = mark {
            for s in self
                .sockets
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
            {
                crate::platform::set_mark(s, m).map_err(|e| Refused {
                    errno: uapi::EADDRINUSE,
                    why: format!("fwmark={m}: {e}"),
                })?;
            }
        }
        super::wg::publish(
            &self.dev,
            &change.conf,
            |k| change.endpoints.contains(k),
            &self.shared,
            self.workers,
        )
        .map_err(|why| Refused {
            errno: uapi::EINVAL,
            why,
        })?;
        *conf = change.conf;
        Ok(())
    }
}

impl State {
    /// Makes `new` (a file read again) the configuration, as `wg syncconf`
    /// would; its peers' count, or why nothing changed. A new ListenPort
    /// is refused here (the caller is the thread that would restart the
    /// workers): `wg set DEV listen-port` moves it.
    pub(super) fn sync(&self, new: WgConf) -> std::result::Result<usize, String> {
        let mut conf = self.conf.lock().unwrap_or_else(|e| e.into_inner());
        let port = *self.port.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = new.listen_port.filter(|&p| p != port) {
            return Err(format!(
                "ListenPort {p} is not the port in use ({port}): use `wg set` to move it, or restart"
            ));
        }
        if new.fwmark != conf.fwmark {
            for s in self
                .sockets
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
            {
                crate::platform::set_mark(s, new.fwmark.unwrap_or(0))
                    .map_err(|e| format!("FwMark: {e}"))?;
            }
        }
        let given: std::collections::HashSet<_> = new
            .peers
            .iter()
            .filter(|p| p.endpoint.is_some())
            .map(|p| p.public_key)
            .collect();
        super::wg::publish(
            &self.dev,
            &new,
            |k| given.contains(k),
            &self.shared,
            self.workers,
        )?;
        let n = new.peers.len();
        *conf = new;
        Ok(n)
    }

    /// Has the runtime restart the workers on port `p`, and takes the new
    /// sockets; Err: nothing changed (the port is taken, or the tunnel is
    /// stopping).
    fn rebind(&self, p: u16) -> std::result::Result<(), Refused> {
        let (tx, rx) = crossbeam::channel::bounded(1);
        let stopping = || Refused {
            errno: uapi::EIO,
            why: "the tunnel is stopping".into(),
        };
        self.events
            .send(super::Event::Rebind(p, tx))
            .map_err(|_| stopping())?;
        let sockets = rx.recv().map_err(|_| stopping())?.map_err(|why| Refused {
            errno: uapi::EADDRINUSE,
            why: format!("listen_port={p}: {why}"),
        })?;
        if let Some(first) = sockets.first().and_then(|s| s.try_clone().ok()) {
            *self.control.lock().unwrap_or_else(|e| e.into_inner()) = first;
        }
        *self.sockets.lock().unwrap_or_else(|e| e.into_inner()) = sockets;
        *self.port.lock().unwrap_or_else(|e| e.into_inner()) = p;
        Ok(())
    }
}

/// A running server; [`Server::stop`] ends it and removes its socket.
pub(super) struct Server {
    path: PathBuf,
    /// The socket file this server bound (device, inode): removed at exit
    /// only if the path still names it.
    bound: Option<(u64, u64)>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Server {
    pub(super) fn path(&self) -> &std::path::Path {
        &self.path
    }

    pub(super) fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        remove_if_ours(&self.path, self.bound);
    }
}

/// The (device, inode) of the file at `path`.
fn file_id(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Removes the socket file at `path` if it is still the one `bound`
/// identifies: another tunnel of the same name (in another namespace) may
/// have replaced it meanwhile, and its socket is not ours to remove.
fn remove_if_ours(path: &std::path::Path, bound: Option<(u64, u64)>) {
    if bound.is_some() && file_id(path) == bound {
        let _ = std::fs::remove_file(path);
    }
}

/// Whether the socket file at `path` is stale: nobody listens on it
/// (ECONNREFUSED). A live server whose backlog is full refuses a
/// connection with EAGAIN: that one is in use, not stale.
fn stale(path: &std::path::Path) -> bool {
    use nix::sys::socket::{UnixAddr, connect};
    // Nonblocking: a full backlog answers EAGAIN instead of holding the
    // start of this tunnel until the other server accepts.
    let Ok(addr) = UnixAddr::new(path) else {
        return false;
    };
    let Some(fd) = nonblocking_stream() else {
        return false;
    };
    connect(fd.as_raw_fd(), &addr) == Err(nix::errno::Errno::ECONNREFUSED)
}

/// A nonblocking, close-on-exec UNIX stream socket (set by fcntl: the
/// socket flags for both are Linux's).
fn nonblocking_stream() -> Option<std::os::fd::OwnedFd> {
    use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .ok()?;
    fcntl(&fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).ok()?;
    fcntl(&fd, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).ok()?;
    Some(fd)
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A listening socket, or the path of one another process serves.
enum Listening {
    Yes(UnixListener, PathBuf),
    InUse(PathBuf),
}

/// The listening socket for interface `iface` in `dir`: created 0700
/// (the mode is set on the socket before it is bound, so it never exists
/// with another); a stale socket nobody answers on is replaced.
fn listen(dir: &std::path::Path, iface: &str) -> Result<Listening> {
    use nix::sys::socket::{AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
    let path = dir.join(format!("{iface}.sock"));
    let what = |op: &str| format!("{op} the WireGuard API socket {}", path.display());
    std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    if path.exists() {
        if !stale(&path) {
            return Ok(Listening::InUse(path));
        }
        std::fs::remove_file(&path).map_err(|e| Error::io(what("remove the stale"), e))?;
    }
    #[cfg(target_os = "linux")]
    let flags = SockFlag::SOCK_CLOEXEC;
    #[cfg(not(target_os = "linux"))]
    let flags = SockFlag::empty();
    let fd = nix::sys::socket::socket(AddressFamily::Unix, SockType::Stream, flags, None)
        .map_err(|e| Error::io(what("create"), e.into()))?;
    #[cfg(not(target_os = "linux"))]
    nix::fcntl::fcntl(
        &fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(|e| Error::io(what("configure"), e.into()))?;
    nix::sys::stat::fchmod(&fd, nix::sys::stat::Mode::from_bits_truncate(0o700))
        .map_err(|e| Error::io(what("set the mode of"), e.into()))?;
    let addr = UnixAddr::new(&path).map_err(|e| Error::io(what("name"), e.into()))?;
    nix::sys::socket::bind(fd.as_raw_fd(), &addr).map_err(|e| Error::io(what("bind"), e.into()))?;
    nix::sys::socket::listen(&fd, Backlog::new(16).unwrap_or(Backlog::MAXCONN))
        .map_err(|e| Error::io(what("listen on"), e.into()))?;
    let listener = UnixListener::from(fd);
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io(what("configure"), e))?;
    Ok(Listening::Yes(listener, path))
}

/// Serves `state` for interface `iface` until stopped. If the socket
/// cannot be made (another process serves the name already, an interface
/// of that name in another network namespace: the directory is the
/// host's; or no permission to make it), that is an error if `required`,
/// else one log line and no server: a file configures the tunnel.
pub(super) fn serve(iface: &str, state: Arc<State>, required: bool) -> Result<Option<Server>> {
    serve_in(std::path::Path::new(SOCKET_DIR), iface, state, required)
}

fn serve_in(
    dir: &std::path::Path,
    iface: &str,
    state: Arc<State>,
    required: bool,
) -> Result<Option<Server>> {
    let failed = match listen(dir, iface) {
        Ok(Listening::Yes(l, p)) => Ok((l, p)),
        Ok(Listening::InUse(path)) => Err(Error::config(format!(
            "{} is in use: another WireGuard implementation serves the name {iface}",
            path.display()
        ))),
        Err(e) => Err(e),
    };
    let (listener, path) = match failed {
        Ok(x) => x,
        Err(e) if required => return Err(e),
        Err(e) => {
            crate::info!("{e}; wg cannot reach this tunnel (its file configures it)");
            return Ok(None);
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let stop = stop.clone();
        thread::Builder::new()
            .name("tunfwd-uapi".into())
            .spawn(move || accept_loop(&listener, &state, &stop))
            .map_err(|e| Error::io("spawn the WireGuard API thread", e))?
    };
    Ok(Some(Server {
        bound: file_id(&path),
        path,
        stop,
        thread: Some(thread),
    }))
}

/// The connections being served, oldest first, by number.
type Open = Arc<Mutex<std::collections::VecDeque<(u64, UnixStream)>>>;

fn accept_loop(listener: &UnixListener, state: &Arc<State>, stop: &AtomicBool) {
    let open: Open = Arc::default();
    let mut next = 0u64;
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                let Ok(handle_of) = stream.try_clone() else {
                    continue;
                };
                let id = next;
                next += 1;
                {
                    let mut o = open.lock().unwrap_or_else(|e| e.into_inner());
                    // Full: the oldest connection makes room (a client
                    // that holds connections open cannot lock `wg` out).
                    if o.len() >= MAX_CONNECTIONS {
                        if let Some((_, oldest)) = o.pop_front() {
                            let _ = oldest.shutdown(std::net::Shutdown::Both);
                        }
                    }
                    o.push_back((id, handle_of));
                }
                let (state, mine) = (state.clone(), open.clone());
                let done = move || {
                    mine.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .retain(|(i, _)| *i != id);
                };
                let spawned = thread::Builder::new()
                    .name("tunfwd-uapi-conn".into())
                    .spawn(move || {
                        let _ = handle(stream, &state);
                        done();
                    });
                if spawned.is_err() {
                    open.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .retain(|(i, _)| *i != id);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let fd = std::os::fd::AsFd::as_fd(listener);
                let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
                let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(200u16));
            }
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Reads one line of at most `budget` bytes into `line` (cleared first):
/// Ok(false) at the end of the stream or on a line cut short by the budget.
fn read_line(
    r: &mut BufReader<UnixStream>,
    line: &mut String,
    budget: usize,
) -> std::io::Result<bool> {
    line.clear();
    let n = r.by_ref().take(budget as u64).read_line(line)?;
    Ok(n > 0 && line.ends_with('\n'))
}

/// One connection: requests until it closes, errs, or breaks the protocol.
fn handle(stream: UnixStream, state: &State) -> std::io::Result<()> {
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    let mut out = stream.try_clone()?;
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    loop {
        if !read_line(&mut r, &mut line, 16)? {
            return Ok(());
        }
        match line.as_str() {
            "get=1\n" => {
                if !read_line(&mut r, &mut line, 1)? || line != "\n" {
                    out.write_all(format!("errno={}\n\n", uapi::EINVAL).as_bytes())?;
                    return Ok(());
                }
                let mut text = state.get();
                text.push_str("errno=0\n\n");
                out.write_all(text.as_bytes())?;
            }
            "set=1\n" => {
                let mut body = String::new();
                let mut ended = false;
                while body.len() < uapi::MAX_REQUEST {
                    if !read_line(&mut r, &mut line, uapi::MAX_REQUEST - body.len())? {
                        break;
                    }
                    if line == "\n" {
                        ended = true;
                        break;
                    }
                    body.push_str(&line);
                }
                if !ended {
                    // Too long, or cut off: refused, nothing changed.
                    out.write_all(format!("errno={}\n\n", uapi::EPROTO).as_bytes())?;
                    return Ok(());
                }
                let lines: Vec<&str> = body.lines().collect();
                let errno = match state.set(&lines) {
                    Ok(()) => 0,
                    Err(e) => {
                        crate::info!("wg set refused: {}", e.why);
                        e.errno
                    }
                };
                out.write_all(format!("errno={errno}\n\n").as_bytes())?;
            }
            _ => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tunfwd-uapi-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn only_a_socket_nobody_listens_on_is_stale() {
        let d = temp_dir("stale");
        let path = d.join("wg9.sock");
        let addr = nix::sys::socket::UnixAddr::new(&path).unwrap();
        // A blocking stream socket bound to `path`.
        let bound = || {
            let fd = nix::sys::socket::socket(
                nix::sys::socket::AddressFamily::Unix,
                nix::sys::socket::SockType::Stream,
                nix::sys::socket::SockFlag::empty(),
                None,
            )
            .unwrap();
            nix::sys::socket::bind(fd.as_raw_fd(), &addr).unwrap();
            fd
        };
        // Bound, never listening: connections are refused.
        let fd = bound();
        assert!(stale(&path), "bound, not listening");
        drop(fd);
        std::fs::remove_file(&path).unwrap();
        // A live listener, and one whose backlog is full (nobody accepts):
        // in use, not stale, so never replaced.
        let fd = bound();
        nix::sys::socket::listen(&fd, nix::sys::socket::Backlog::new(1).unwrap()).unwrap();
        let listener = UnixListener::from(fd);
        assert!(!stale(&path), "listening");
        let mut held = Vec::new();
        let full = (0..64).any(|_| {
            let s = nonblocking_stream().unwrap();
            let r = nix::sys::socket::connect(s.as_raw_fd(), &addr);
            held.push(s);
            r == Err(nix::errno::Errno::EAGAIN)
        });
        assert!(full, "the backlog filled");
        assert!(!stale(&path), "a full backlog is a live server");
        drop(listener);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_socket_another_server_put_in_its_place_is_left_alone() {
        let d = temp_dir("ours");
        let path = d.join("wg9.sock");
        let first = UnixListener::bind(&path).unwrap();
        let ours = file_id(&path);
        assert!(ours.is_some());
        // Another tunnel of the same name replaced it.
        std::fs::remove_file(&path).unwrap();
        let second = UnixListener::bind(&path).unwrap();
        remove_if_ours(&path, ours);
        assert!(path.exists(), "the other server's socket stays");
        let theirs = file_id(&path);
        remove_if_ours(&path, theirs);
        assert!(!path.exists(), "its own is removed");
        drop((first, second));
        let _ = std::fs::remove_dir_all(&d);
    }
}
