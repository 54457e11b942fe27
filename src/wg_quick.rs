//! `tunfwd-wg`: tunfwd behind wireguard-go's command-line contract, so
//! that wg-quick (and anything else that starts wireguard-go) runs tunfwd
//! instead: `WG_QUICK_USERSPACE_IMPLEMENTATION=tunfwd-wg wg-quick up wg0`.
//!
//! `tunfwd-wg IFACE` creates the TUN device IFACE and its API socket
//! (`/var/run/wireguard/IFACE.sock`), with no key and no peers for `wg` to
//! set, and returns once both exist; the tunnel goes on in the background
//! (`-f` keeps it in front). It stops cleanly, removing its socket, on
//! SIGTERM or SIGINT, or when the interface is deleted (`ip link del`,
//! which is what `wg-quick down` does). Engine and tuning flags of
//! `tunfwd tunnel` come from `TUNFWD_WG_FLAGS`; the background tunnel's
//! log goes to `TUNFWD_WG_LOG` (appended), else nowhere.

use std::ffi::OsString;
use std::io::{Read as _, Write as _};
use std::process::ExitCode;

/// The extra `tunfwd tunnel` flags (split at white space).
pub const FLAGS_VAR: &str = "TUNFWD_WG_FLAGS";
/// Where the background tunnel's log goes.
pub const LOG_VAR: &str = "TUNFWD_WG_LOG";

const USAGE: &str = "\
Usage: tunfwd-wg [-f|--foreground] INTERFACE

Runs tunfwd as the WireGuard implementation of INTERFACE, with the contract
of wireguard-go: it creates the TUN device INTERFACE and the API socket
/var/run/wireguard/INTERFACE.sock (for wg and wg-quick), both empty of keys
and peers, and returns once both exist while the tunnel goes on in the
background. It stops, removing the socket, on SIGTERM or when the interface
is deleted (ip link del INTERFACE, as wg-quick down does).

  -f, --foreground  stay in the foreground, logging to standard error
  -h, --help        this text
  --version         the version

Environment:
  TUNFWD_WG_FLAGS   more flags of `tunfwd tunnel`, split at white space, e.g.
                    \"--engine poll --queues 2 --mtu 1380\" (see tunfwd tunnel --help)
  TUNFWD_WG_LOG     a file the background tunnel appends its log to
                    (default: none)

With wg-quick: WG_QUICK_USERSPACE_IMPLEMENTATION=tunfwd-wg wg-quick up wg0
";

/// The `tunfwd tunnel` command line for `iface`, with the `flags` of
/// [`FLAGS_VAR`].
pub fn tunnel_argv(iface: &str, flags: &str) -> Vec<OsString> {
    let mut argv: Vec<OsString> = ["tunfwd", "tunnel", "--dev", iface, "--wireguard"]
        .iter()
        .map(OsString::from)
        .collect();
    argv.extend(flags.split_whitespace().map(OsString::from));
    argv
}

/// What the command line asks.
#[derive(Debug, PartialEq, Eq)]
enum Args {
    Run { iface: String, foreground: bool },
    Help,
    Version,
}

fn parse(args: &[String]) -> Result<Args, String> {
    let mut iface = None;
    let mut foreground = false;
    for a in args {
        match a.as_str() {
            "-f" | "--foreground" => foreground = true,
            "-h" | "--help" => return Ok(Args::Help),
            "--version" => return Ok(Args::Version),
            s if s.starts_with('-') => return Err(format!("unknown option {s}")),
            s if iface.is_none() => iface = Some(s.to_string()),
            s => return Err(format!("one interface only (also got {s})")),
        }
    }
    let iface = iface.ok_or("no INTERFACE given")?;
    Ok(Args::Run { iface, foreground })
}

pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (iface, foreground) = match parse(&args) {
        Ok(Args::Run { iface, foreground }) => (iface, foreground),
        Ok(Args::Help) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(Args::Version) => {
            println!("tunfwd-wg {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprint!("tunfwd-wg: {e}\n\n{USAGE}");
            return ExitCode::FAILURE;
        }
    };
    let flags = std::env::var(FLAGS_VAR).unwrap_or_default();
    // The configuration first, so that a bad flag fails in the foreground.
    let cfg = match crate::cli::tunnel_config(tunnel_argv(&iface, &flags)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tunfwd-wg: {e}");
            return ExitCode::FAILURE;
        }
    };
    if foreground {
        return run(&iface, &cfg, || {});
    }
    // The background: a child that says when the interface is up.
    let (ready_rx, ready_tx) = match crate::platform::pipe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("tunfwd-wg: create a pipe: {e}");
            return ExitCode::FAILURE;
        }
    };
    match crate::sys::fork_before_threads() {
        Err(e) => {
            eprintln!("tunfwd-wg: fork: {e}");
            ExitCode::FAILURE
        }
        Ok(Some(_child)) => {
            drop(ready_tx);
            let mut said = String::new();
            let _ = std::fs::File::from(ready_rx).read_to_string(&mut said);
            match said.strip_prefix("up") {
                Some(_) => ExitCode::SUCCESS,
                None => {
                    let why = if said.is_empty() {
                        "the tunnel stopped before the interface was up".to_string()
                    } else {
                        said
                    };
                    eprintln!("tunfwd-wg: {iface}: {}", why.trim_end());
                    ExitCode::FAILURE
                }
            }
        }
        Ok(None) => {
            drop(ready_rx);
            let mut ready = Some(std::fs::File::from(ready_tx));
            if let Err(e) = detach() {
                if let Some(mut r) = ready {
                    let _ = write!(r, "detach from the terminal: {e}");
                }
                return ExitCode::FAILURE;
            }
            // Said once, and the pipe closed: the parent returns.
            let code = run(&iface, &cfg, || {
                if let Some(mut r) = ready.take() {
                    let _ = r.write_all(b"up");
                }
            });
            if let Some(mut r) = ready {
                let _ = write!(r, "the tunnel failed to start (see {LOG_VAR})");
            }
            code
        }
    }
}

/// The child's own session, and standard input and output on /dev/null;
/// standard error on [`LOG_VAR`]'s file, else /dev/null.
fn detach() -> std::io::Result<()> {
    nix::unistd::setsid()?;
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    let log = match std::env::var_os(LOG_VAR) {
        Some(path) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?,
        None => null.try_clone()?,
    };
    nix::unistd::dup2_stdin(&null)?;
    nix::unistd::dup2_stdout(&null)?;
    nix::unistd::dup2_stderr(&log)?;
    Ok(())
}

/// Runs the tunnel until it stops: 0 on a stop signal, or when it stopped
/// because the interface was deleted; 1 otherwise.
fn run(iface: &str, cfg: &crate::config::TunnelConfig, up: impl FnOnce()) -> ExitCode {
    if let Err(e) = crate::runtime::block_stop_signals() {
        crate::info!("error: {e}");
        return ExitCode::FAILURE;
    }
    match crate::runtime::run_tunnel_then(cfg, up) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) if nix::net::if_::if_nametoindex(iface).is_err() => {
            crate::info!("{iface} was deleted: stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            crate::info!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            parse(&s(&["wg0"])),
            Ok(Args::Run {
                iface: "wg0".into(),
                foreground: false
            })
        );
        assert_eq!(
            parse(&s(&["-f", "wg0"])),
            Ok(Args::Run {
                iface: "wg0".into(),
                foreground: true
            })
        );
        assert_eq!(parse(&s(&["--help"])), Ok(Args::Help));
        assert!(parse(&s(&[])).is_err());
        assert!(parse(&s(&["wg0", "wg1"])).is_err());
        assert!(parse(&s(&["--nope", "wg0"])).is_err());
        let argv = tunnel_argv("wg0", " --engine poll  --queues 2 ");
        let cfg = crate::cli::tunnel_config(argv).unwrap();
        assert!(cfg.mode.is_wireguard());
        assert_eq!(cfg.engine.queues, 2);
        assert_eq!(cfg.device.mtu, crate::config::DEFAULT_MTU_WIREGUARD);
        assert!(crate::cli::tunnel_config(tunnel_argv("wg0", "--peer 198.18.0.2:1")).is_err());
    }
}
