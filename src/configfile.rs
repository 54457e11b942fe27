//! `tunfwd tunnel --config FILE`: the same settings as the command line, in
//! TOML. Keys are the long flag names (`listen = "198.18.0.1:5000"`,
//! `mtu = 1400`, `peer = ["198.18.0.2:5000=198.19.0.0/24"]`, `busy-poll =
//! true`); a flag given on the command line wins over the file (for a
//! repeatable flag, the command line's list replaces the file's).
//!
//! The file becomes command-line arguments placed before the real ones, so
//! clap parses and checks everything once, the same way. Each value is
//! first checked by its flag's own parser, so a bad value, an unknown key or
//! a TOML syntax error is reported with the file, line and key.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Where the file's settings came from, to name them in later errors.
#[derive(Clone, Debug, Default)]
pub struct Origin {
    pub path: PathBuf,
    /// Keys taken from the file, with their lines.
    pub keys: Vec<(String, usize)>,
}

impl Origin {
    /// An error about a flag that came from the file gains its place
    /// (`(config FILE line L: key "k")`).
    pub fn locate(&self, e: Error) -> Error {
        let msg = e.to_string();
        let hit = self.keys.iter().find(|(k, _)| {
            let flag = format!("--{k}");
            msg.match_indices(&flag).any(|(i, _)| {
                // The whole flag, not the start of a longer one.
                !msg[i + flag.len()..].starts_with(|c: char| c.is_ascii_alphanumeric() || c == '-')
            })
        });
        match hit {
            Some((k, line)) => Error::config(format!(
                "{msg} (config {} line {line}: key \"{k}\")",
                self.path.display()
            )),
            None => e,
        }
    }
}

/// The line (from 1) of byte `at` in `text` (counted over bytes: `at`
/// need not fall on a character boundary).
fn line_of(text: &str, at: usize) -> usize {
    let bytes = text.as_bytes();
    bytes[..at.min(bytes.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The value of `--config` on a `tunnel` command line, if any.
fn config_path(rest: &[OsString]) -> Option<PathBuf> {
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--" {
            return None;
        }
        if s == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = s.strip_prefix("--config=") {
            return Some(PathBuf::from(v));
        }
    }
    None
}

/// The long flags given on the command line (before a `--`).
fn given_flags(rest: &[OsString]) -> Vec<String> {
    rest.iter()
        .map(|a| a.to_string_lossy().into_owned())
        .take_while(|s| s != "--")
        .filter_map(|s| {
            let name = s.strip_prefix("--")?;
            Some(name.split('=').next().unwrap_or(name).to_string())
        })
        .collect()
}

/// The command line with the `--config` file's settings put in front of
/// the `tunnel` subcommand's own arguments, and where they came from.
/// Anything but `tunfwd tunnel ... --config FILE` is returned unchanged.
pub fn expand(raw: Vec<OsString>, cli: &clap::Command) -> Result<(Vec<OsString>, Option<Origin>)> {
    let is_tunnel = raw.get(1).is_some_and(|a| a == "tunnel");
    let Some(path) = is_tunnel.then(|| config_path(&raw[2..])).flatten() else {
        return Ok((raw, None));
    };
    let Some(cmd) = cli.find_subcommand("tunnel") else {
        return Ok((raw, None));
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::io(format!("read config file {}", path.display()), e))?;
    let given = given_flags(&raw[2..]);
    let (args, keys) = file_args(&text, &path, cmd, &given)?;
    let mut out = Vec::with_capacity(raw.len() + args.len());
    out.extend_from_slice(&raw[..2]);
    out.extend(args);
    out.extend_from_slice(&raw[2..]);
    Ok((out, Some(Origin { path, keys })))
}

/// The arguments the file `text` (at `path`) stands for, skipping flags in
/// `given`; and each key used with its line.
#[allow(clippy::type_complexity)]
fn file_args(
    text: &str,
    path: &Path,
    cmd: &clap::Command,
    given: &[String],
) -> Result<(Vec<OsString>, Vec<(String, usize)>)> {
    let at = |line: usize| format!("config {} line {line}", path.display());
    let doc = toml_edit::ImDocument::parse(text).map_err(|e| {
        let line = e.span().map_or(1, |s| line_of(text, s.start));
        let msg = e.message().trim().replace('\n', " ");
        Error::config(format!("{}: {msg}", at(line)))
    })?;
    let mut args = Vec::new();
    let mut keys = Vec::new();
    for (key, item) in doc.as_table().iter() {
        let line = doc
            .as_table()
            .key(key)
            .and_then(|k| k.span())
            .or_else(|| item.span())
            .map_or(1, |s| line_of(text, s.start));
        let bad = |what: String| Error::config(format!("{}: key \"{key}\": {what}", at(line)));
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(key) && !matches!(key, "config" | "help"))
            .ok_or_else(|| {
                bad(
                    "unknown key (keys are the long flag names of `tunfwd tunnel`, e.g. \
                     listen, peer, mtu, stats-interval)"
                        .into(),
                )
            })?;
        let Some(value) = item.as_value() else {
            return Err(bad(
                "a table is not a setting (keys are flag names at the top level)".into(),
            ));
        };
        let values: Vec<&toml_edit::Value> = match value.as_array() {
            Some(a) => a.iter().collect(),
            None => vec![value],
        };
        let repeatable = matches!(arg.get_action(), clap::ArgAction::Append);
        if value.is_array() && !repeatable {
            return Err(bad(format!("--{key} takes one value, not a list")));
        }
        // Every value is checked, even one the command line overrides: a
        // bad file is refused the same way with or without the override.
        // Only keys that take effect are recorded to be blamed later.
        let overridden = given.iter().any(|g| g == key);
        if !overridden {
            keys.push((key.to_string(), line));
        }
        let takes_value = arg.get_action().takes_values();
        let optional_value = arg
            .get_num_args()
            .is_some_and(|n| n.min_values() == 0 && n.takes_values());
        for v in values {
            let scalar = match v {
                toml_edit::Value::String(s) => s.value().clone(),
                toml_edit::Value::Integer(i) => i.value().to_string(),
                toml_edit::Value::Float(_) => {
                    return Err(bad(format!(
                        "--{key} takes an integer or a string, not a number with a fraction \
                         or exponent"
                    )));
                }
                toml_edit::Value::Boolean(b) if !takes_value || optional_value => {
                    // A switch (or a flag whose value may be left out):
                    // true sets it, false leaves it off.
                    if *b.value() && !overridden {
                        args.push(OsString::from(format!("--{key}")));
                    }
                    continue;
                }
                toml_edit::Value::Boolean(_) => {
                    return Err(bad(format!("--{key} takes a value, not true/false")));
                }
                _ => {
                    return Err(bad(
                        "expected a string, a number, true/false or a list".into()
                    ));
                }
            };
            if !takes_value {
                return Err(bad(format!(
                    "--{key} is a switch: write {key} = true (or false)"
                )));
            }
            let flag = OsString::from(format!("--{key}={scalar}"));
            check_value(cmd, &flag).map_err(bad)?;
            if !overridden {
                args.push(flag);
            }
        }
    }
    Ok((args, keys))
}

/// Parses `flag` (`--key=value`) alone with `cmd`: Err with clap's message
/// if the value is what is wrong (missing required flags are not).
fn check_value(cmd: &clap::Command, flag: &OsStr) -> std::result::Result<(), String> {
    use clap::error::ErrorKind;
    match cmd
        .clone()
        .try_get_matches_from([OsStr::new("tunnel"), flag])
    {
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::InvalidValue
                    | ErrorKind::ValueValidation
                    | ErrorKind::InvalidUtf8
                    | ErrorKind::NoEquals
                    | ErrorKind::WrongNumberOfValues
                    | ErrorKind::TooManyValues
            ) =>
        {
            Err(clap_message(&e))
        }
        _ => Ok(()),
    }
}

/// The first line of a clap error, without its `error: ` prefix.
fn clap_message(e: &clap::Error) -> String {
    let s = e.to_string();
    let first = s.lines().next().unwrap_or("").trim();
    first.strip_prefix("error: ").unwrap_or(first).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli() -> clap::Command {
        <crate::cli::Cli as clap::CommandFactory>::command()
    }

    fn expand_text(text: &str, cmdline: &[&str]) -> Result<Vec<String>> {
        let dir = std::env::temp_dir().join(format!(
            "tunfwd-configfile-{}-{}",
            std::process::id(),
            text.len()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.toml");
        std::fs::write(&path, text).unwrap();
        let mut raw: Vec<OsString> = vec!["tunfwd".into(), "tunnel".into()];
        raw.extend(cmdline.iter().map(OsString::from));
        raw.push("--config".into());
        raw.push(path.clone().into());
        let r = expand(raw, &cli()).map(|(a, _)| {
            a.into_iter()
                .map(|s| s.to_string_lossy().into_owned())
                .collect()
        });
        let _ = std::fs::remove_dir_all(&dir);
        r.map_err(|e| Error::config(e.to_string().replace(&path.display().to_string(), "F")))
    }

    #[test]
    fn keys_become_flags_before_the_command_line() {
        let args = expand_text(
            "# a tunnel\nlisten = \"198.18.0.1:5000\"\nmtu = 1400\n\
             peer = [\"198.18.0.2:5000=198.19.0.0/24\", \"198.18.0.3:5000=198.19.1.0/24\"]\n\
             busy-poll = true\nattach = false\nstats-interval = 2\n",
            &["--mtu", "1300"],
        )
        .unwrap();
        assert_eq!(
            &args[2..args.len() - 1],
            [
                "--listen=198.18.0.1:5000",
                "--peer=198.18.0.2:5000=198.19.0.0/24",
                "--peer=198.18.0.3:5000=198.19.1.0/24",
                "--busy-poll",
                "--stats-interval=2",
                "--mtu",
                "1300",
                "--config",
            ]
        );
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let cases = [
            (
                "listen = \"198.18.0.1:5000\"\nnope = 1\n",
                "config F line 2: key \"nope\": unknown key",
            ),
            (
                "listen = \"x\"\n",
                "config F line 1: key \"listen\": invalid value 'x' for '--listen <ADDR:PORT>'",
            ),
            (
                "mtu = \"big\"\n",
                "config F line 1: key \"mtu\": invalid value 'big' for '--mtu <BYTES>'",
            ),
            (
                "\n\nmtu = [1, 2]\n",
                "config F line 3: key \"mtu\": --mtu takes one value, not a list",
            ),
            (
                "busy-poll = 1\n",
                "config F line 1: key \"busy-poll\": --busy-poll is a switch",
            ),
            (
                "engine = \"fast\"\n",
                "config F line 1: key \"engine\": invalid value 'fast'",
            ),
            (
                "[section]\nmtu = 1\n",
                "config F line 1: key \"section\": unknown key",
            ),
            ("mtu = 1400\nmtu = 1300\n", "config F line 2: "),
            ("listen = \n", "config F line 1: "),
            ("config = \"other.toml\"\n", "key \"config\": unknown key"),
            (
                "dev = true\n",
                "key \"dev\": --dev takes a value, not true/false",
            ),
            (
                "mtu = 1.4e3\n",
                "config F line 1: key \"mtu\": --mtu takes an integer or a string",
            ),
            (
                "\nmtu = 1400.0\n",
                "config F line 2: key \"mtu\": --mtu takes an integer or a string",
            ),
        ];
        for (text, want) in cases {
            let e = expand_text(text, &[]).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn locates_later_errors_by_flag() {
        let o = Origin {
            path: "/etc/tunfwd/t.toml".into(),
            keys: vec![("queues".into(), 4), ("peer".into(), 7)],
        };
        let e = o.locate(Error::config("--queues 0 is out of range 1..=256"));
        assert_eq!(
            e.to_string(),
            "--queues 0 is out of range 1..=256 (config /etc/tunfwd/t.toml line 4: key \"queues\")"
        );
        // --peers-file is not --peer.
        let e = o.locate(Error::config("--peers-file: bad"));
        assert_eq!(e.to_string(), "--peers-file: bad");
    }

    /// A value the command line overrides is still checked, and a key the
    /// command line overrides is not blamed for the command line's error.
    #[test]
    fn overridden_keys_are_checked_but_not_blamed() {
        let e = expand_text("mtu = \"big\"\n", &["--mtu", "1400"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("config F line 1: key \"mtu\": invalid value 'big'"),
            "{e}"
        );
        let e = expand_text("mtu = 1400.0\n", &["--mtu=1400"]).unwrap_err();
        assert!(e.to_string().contains("takes an integer"), "{e}");

        let dir =
            std::env::temp_dir().join(format!("tunfwd-configfile-blame-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.toml");
        std::fs::write(&path, "listen = \"198.18.0.1:5000\"\n\nqueues = 2\n").unwrap();
        let raw: Vec<OsString> = ["tunfwd", "tunnel", "--queues", "0", "--config"]
            .iter()
            .map(OsString::from)
            .chain([path.clone().into_os_string()])
            .collect();
        let (_, origin) = expand(raw, &cli()).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let origin = origin.unwrap();
        assert_eq!(origin.keys, [("listen".to_string(), 1)]);
        let e = origin.locate(Error::config("--queues 0 is out of range 1..=256"));
        assert_eq!(e.to_string(), "--queues 0 is out of range 1..=256");
    }

    /// Lines are counted over bytes: an offset inside a multi-byte
    /// character does not panic.
    #[test]
    fn line_of_counts_bytes() {
        let text = "# é\nmtu = 1\n";
        assert_eq!(line_of(text, 3), 1); // inside 'é'
        assert_eq!(line_of(text, 5), 2);
        assert_eq!(line_of(text, 1000), 3);
        let e = expand_text("# café\nmtu = = 1\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("config F line 2"), "{e}");
    }

    /// The same settings from a file and from flags make the same
    /// configuration; a flag on the command line beats the file.
    /// `tunfwd tunnel ARGS`.
    fn argv(a: &[&str]) -> Vec<OsString> {
        ["tunfwd", "tunnel"]
            .iter()
            .chain(a)
            .map(OsString::from)
            .collect()
    }

    #[test]
    fn a_file_equals_its_flags_and_loses_to_the_command_line() {
        let dir = std::env::temp_dir().join(format!("tunfwd-configfile-eq-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.toml");
        std::fs::write(
            &path,
            "dev = \"tfw%d\"\naddress = [\"198.19.0.1/24\", \"2001:db8:19::1/64\"]\nmtu = 1400\n\
             listen = \"198.18.0.1:5000\"\npeer = [\"198.18.0.2:5000=198.19.0.2/32\", \"198.18.0.3:5000=198.19.0.3/32\"]\n\
             engine = \"poll\"\nqueues = 2\nbatch = 32\nbusy-poll = true\nstats-interval = 5\n\
             stats-format = \"json\"\nmetrics = \"9500\"\naqm = \"codel\"\naqm-target-us = 800\n\
             offload = \"off\"\nsndbuf = 2097152\ncpus = \"none\"\n",
        )
        .unwrap();
        let flags = argv(&[
            "--dev",
            "tfw%d",
            "--address",
            "198.19.0.1/24",
            "--address",
            "2001:db8:19::1/64",
            "--mtu",
            "1400",
            "--listen",
            "198.18.0.1:5000",
            "--peer",
            "198.18.0.2:5000=198.19.0.2/32",
            "--peer",
            "198.18.0.3:5000=198.19.0.3/32",
            "--engine",
            "poll",
            "--queues",
            "2",
            "--batch",
            "32",
            "--busy-poll",
            "--stats-interval",
            "5",
            "--stats-format",
            "json",
            "--metrics",
            "9500",
            "--aqm",
            "codel",
            "--aqm-target-us",
            "800",
            "--offload",
            "off",
            "--sndbuf",
            "2097152",
            "--cpus",
            "none",
        ]);
        let p = path.display().to_string();
        let from_flags = crate::cli::tunnel_config(flags).unwrap();
        let from_file = crate::cli::tunnel_config(argv(&["--config", &p])).unwrap();
        assert_eq!(format!("{from_file:?}"), format!("{from_flags:?}"));
        // The command line wins, a list replaces the file's list.
        let over = crate::cli::tunnel_config(argv(&[
            "--config",
            &p,
            "--mtu",
            "1300",
            "--peer",
            "198.18.0.9:5000",
        ]))
        .unwrap();
        assert_eq!(over.device.mtu, 1300);
        assert_eq!(over.peers.list.len(), 1);
        assert_eq!(over.engine.batch, 32);
        // A range error found after parsing names the file's line.
        std::fs::write(
            &path,
            "listen = \"198.18.0.1:5000\"\npeer = [\"198.18.0.2:5000\"]\nqueues = 0\n",
        )
        .unwrap();
        let e = crate::cli::tunnel_config(argv(&["--config", &p]))
            .unwrap_err()
            .to_string();
        assert!(
            e.ends_with(&format!("(config {p} line 3: key \"queues\")")),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn queues_auto_counts_cpus_where_the_queues_share_a_port() {
        let cfg = |a: &[&str]| crate::cli::tunnel_config(argv(a)).unwrap();
        let q = |a: &[&str]| cfg(a).engine.queues;
        let plain = ["--listen", "198.18.0.1:5000", "--peer", "198.18.0.2:5000"];
        // Plaintext, by default (auto): the queues share the one port
        // (steered by inner flow), so the ends need not agree; auto counts
        // the CPUs, and the runtime may take fewer.
        let c = cfg(&[&plain[..], &["--queues", "auto", "--cpus", "0-3"]].concat());
        assert_eq!(c.engine.queues, 4);
        assert!(c.engine.queues_auto && c.shares_port() && c.steers_by_inner_flow());
        assert!(cfg(&plain).engine.queues_auto);
        // --share-port: the same, and with a number too.
        let shared = [&plain[..], &["--share-port"]].concat();
        let c = cfg(&[&shared[..], &["--cpus", "0-3"]].concat());
        assert_eq!(c.engine.queues, 4);
        assert!(c.shares_port() && c.steers_by_inner_flow());
        assert_eq!(c.port_queues(), 1);
        assert_eq!(c.listen_for(3), c.listen_for(0));
        let c = cfg(&[&shared[..], &["--queues", "3"]].concat());
        assert_eq!(c.engine.queues, 3);
        assert!(c.shares_port());
        // A number without it: queue i binds PORT+i.
        let c = cfg(&[&plain[..], &["--queues", "3"]].concat());
        assert_eq!(c.engine.queues, 3);
        assert!(!c.shares_port() && !c.engine.queues_auto);
        assert_eq!(c.listen_for(2).port(), 5002);
        // One CPU: one queue, nothing shared.
        let c = cfg(&[&shared[..], &["--cpus", "1"]].concat());
        assert_eq!(c.engine.queues, 1);
        assert!(!c.shares_port() && !c.steers_by_inner_flow());
        // Not for TAP (VXLAN) tunnels.
        let tap = [
            "--mode",
            "tap",
            "--vni",
            "42",
            "--listen",
            "198.18.0.1:4789",
            "--peer",
            "198.18.0.2:4789",
            "--share-port",
        ];
        let e = crate::cli::tunnel_config(argv(&tap))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--share-port applies to plaintext TUN tunnels"),
            "{e}"
        );
        // WireGuard: one port for every queue; one queue per CPU of the
        // plan (distinct), up to MAX_AUTO_QUEUES.
        let wg = ["--wireguard", "--listen", "[::]:51820"];
        assert_eq!(q(&[&wg[..], &["--cpus", "0-2,1"]].concat()), 3);
        let c = crate::cli::tunnel_config(argv(&wg)).unwrap();
        assert!(
            c.queues_per_peer(),
            "at most one per peer, once the peers are read"
        );
        assert_eq!(
            q(&[&wg[..], &["--cpus", "0-63"]].concat()),
            crate::config::MAX_AUTO_QUEUES
        );
        assert_eq!(
            q(&[&wg[..], &["--queues", "1", "--cpus", "0-3"]].concat()),
            1
        );
        let affinity = crate::platform::allowed_cpus().unwrap().len();
        assert_eq!(
            q(&wg),
            affinity.clamp(1, crate::config::MAX_AUTO_QUEUES),
            "the process's CPUs"
        );
        let e = crate::cli::tunnel_config(argv(&[&wg[..], &["--queues", "many"]].concat()))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"many\" is not a number of queues or `auto`"),
            "{e}"
        );
    }

    #[test]
    fn wireguard_keys_work_in_a_file_and_on_the_command_line() {
        let dir = std::env::temp_dir().join(format!("tunfwd-configfile-wg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.toml");
        std::fs::write(
            &path,
            "wg-config = \"/etc/tunfwd/a.conf\"\naddress = [\"198.19.0.1/24\"]\n",
        )
        .unwrap();
        let p = path.display().to_string();
        let c = crate::cli::tunnel_config(argv(&["--config", &p])).unwrap();
        assert_eq!(
            c.mode,
            crate::config::Mode::WireGuard {
                config: Some("/etc/tunfwd/a.conf".into()),
                listen_from_file: true
            }
        );
        assert_eq!(c.device.mtu, crate::config::DEFAULT_MTU_WIREGUARD);
        assert_eq!(c.peers.listen, "[::]:0".parse().unwrap());
        // --listen and --mtu given: they stand.
        let c = crate::cli::tunnel_config(argv(&[
            "--config",
            &p,
            "--listen",
            "198.18.0.1:51820",
            "--mtu",
            "1380",
        ]))
        .unwrap();
        assert!(matches!(
            c.mode,
            crate::config::Mode::WireGuard {
                listen_from_file: false,
                ..
            }
        ));
        assert_eq!((c.device.mtu, c.peers.listen.port()), (1380, 51820));
        // What WireGuard mode replaces, or cannot do yet, is refused.
        for (extra, want) in [
            (&["--peer", "198.18.0.2:5000"][..], "cannot be used with"),
            (&["--mode", "tap"][..], "use it with --mode tun"),
        ] {
            let mut a = vec!["--config", p.as_str()];
            a.extend_from_slice(extra);
            let e = crate::cli::tunnel_config(argv(&a)).unwrap_err().to_string();
            assert!(e.contains(want), "{extra:?}: {e}");
        }
        // Without WireGuard, --listen is required.
        let e = crate::cli::tunnel_config(argv(&["--peer", "198.18.0.2:5000"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--listen ADDR:PORT is required"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn other_commands_are_untouched() {
        let raw: Vec<OsString> = ["tunfwd", "bench", "--config", "x"]
            .map(OsString::from)
            .to_vec();
        let (out, origin) = expand(raw.clone(), &cli()).unwrap();
        assert_eq!(out, raw);
        assert!(origin.is_none());
    }
}
