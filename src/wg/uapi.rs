//! WireGuard's cross-platform userspace API (wireguard.com/xplatform), as
//! `wg` speaks it over a UNIX socket: `get=1` answered with the interface
//! and its peers as `key=value` lines, and `set=1` followed by `key=value`
//! lines up to a blank line, each answered with `errno=N` (0, or a negative
//! errno as wireguard-go sends it). Pure code over text: the runtime's
//! server reads requests, and applies what [`apply_set`] returns. A set is
//! checked whole before anything changes: a bad line changes nothing.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::net::SocketAddr;

use super::conf::{WgConf, WgPeer};
use super::key::{PublicKey, Secret};
use crate::types::Prefix;

/// The protocol's error numbers (wireguard-go's `ipc` package).
pub const EIO: i32 = -libc::EIO;
pub const EPROTO: i32 = -libc::EPROTO;
pub const EINVAL: i32 = -libc::EINVAL;
pub const EADDRINUSE: i32 = -libc::EADDRINUSE;

/// Largest request tunfwd reads (a `wg setconf` of some thousands of
/// peers); a longer one is refused whole with [`EPROTO`].
pub const MAX_REQUEST: usize = 1 << 20;

/// Why a request failed: its errno and what to log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub errno: i32,
    pub why: String,
}

fn refuse(errno: i32, why: impl Into<String>) -> Refused {
    Refused {
        errno,
        why: why.into(),
    }
}

/// What a `set` asks, once checked: the interface as it is to be, which
/// peers it gave an endpoint, and whether it names a listen port or fwmark.
#[derive(Clone, Debug)]
pub struct Change {
    pub conf: WgConf,
    pub endpoints: HashSet<PublicKey>,
    pub listen_port: Option<u16>,
    pub fwmark: Option<u32>,
}

fn hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn hex(b: &[u8; 32]) -> String {
    let mut s = String::with_capacity(64);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

/// Applies the lines of a `set` (without the `set=1` line and the blank
/// line ending it) to `current`; `own` is the interface's public key after
/// any `private_key` line (a peer with it is ignored, as wireguard-go
/// does). A prefix given to a peer leaves any other peer (AllowedIPs are
/// a routing table).
pub fn apply_set(current: &WgConf, lines: &[&str]) -> Result<Change, Refused> {
    let mut conf = current.clone();
    let mut change = Change {
        conf: current.clone(),
        endpoints: HashSet::new(),
        listen_port: None,
        fwmark: None,
    };
    let bool_true = |key: &str, value: &str| {
        if value == "true" {
            Ok(())
        } else {
            Err(refuse(
                EINVAL,
                format!("{key}={value}: only true is allowed"),
            ))
        }
    };
    // The peer being configured: its index in `conf.peers`, None for one
    // that is ignored (removed, update_only of an unknown one, our own key).
    let mut peer: Option<Option<usize>> = None;
    let mut created = false;
    for line in lines {
        let Some((key, value)) = line.split_once('=') else {
            return Err(refuse(EPROTO, format!("not key=value: {line:?}")));
        };
        if key == "public_key" {
            let k = hex32(value)
                .map(PublicKey)
                .ok_or_else(|| refuse(EINVAL, "public_key: not 64 hex digits"))?;
            if conf.private_key.as_ref().map(Secret::public_key) == Some(k) {
                peer = Some(None);
                continue;
            }
            let at = conf.peers.iter().position(|p| p.public_key == k);
            created = at.is_none();
            let at = at.unwrap_or_else(|| {
                conf.peers.push(WgPeer {
                    public_key: k,
                    preshared_key: None,
                    endpoint: None,
                    allowed_ips: Vec::new(),
                    persistent_keepalive: None,
                    line: 0,
                });
                conf.peers.len() - 1
            });
            peer = Some(Some(at));
            continue;
        }
        let Some(selected) = peer else {
            // Interface lines.
            match key {
                "private_key" => {
                    let k = hex32(value)
                        .ok_or_else(|| refuse(EINVAL, "private_key: not 64 hex digits"))?;
                    // All zeros: no key (the interface goes quiet).
                    conf.private_key = (k != [0; 32]).then(|| Secret::from_bytes(k));
                }
                "listen_port" => {
                    let p = value
                        .parse::<u16>()
                        .map_err(|_| refuse(EINVAL, format!("listen_port={value}")))?;
                    conf.listen_port = Some(p);
                    change.listen_port = Some(p);
                }
                "fwmark" => {
                    let m = value
                        .parse::<u32>()
                        .map_err(|_| refuse(EINVAL, format!("fwmark={value}")))?;
                    conf.fwmark = (m != 0).then_some(m);
                    change.fwmark = Some(m);
                }
                "replace_peers" => {
                    bool_true(key, value)?;
                    conf.peers.clear();
                }
                _ => return Err(refuse(EINVAL, format!("unknown interface key {key:?}"))),
            }
            continue;
        };
        match key {
            "protocol_version" if value == "1" => {}
            "protocol_version" => {
                return Err(refuse(EINVAL, format!("protocol_version={value}")));
            }
            _ => {}
        }
        let Some(i) = selected else {
            // An ignored peer's lines are checked by kind only.
            if !matches!(
                key,
                "protocol_version"
                    | "update_only"
                    | "remove"
                    | "preshared_key"
                    | "endpoint"
                    | "persistent_keepalive_interval"
                    | "replace_allowed_ips"
                    | "allowed_ip"
            ) {
                return Err(refuse(EINVAL, format!("unknown peer key {key:?}")));
            }
            continue;
        };
        match key {
            "protocol_version" => {}
            "update_only" => {
                bool_true(key, value)?;
                if created {
                    conf.peers.remove(i);
                    peer = Some(None);
                }
            }
            "remove" => {
                bool_true(key, value)?;
                let k = conf.peers.remove(i).public_key;
                change.endpoints.remove(&k);
                peer = Some(None);
            }
            "preshared_key" => {
                let k = hex32(value)
                    .ok_or_else(|| refuse(EINVAL, "preshared_key: not 64 hex digits"))?;
                conf.peers[i].preshared_key = (k != [0; 32]).then(|| Secret::from_bytes(k));
            }
            "endpoint" => {
                let e = value
                    .parse::<SocketAddr>()
                    .map_err(|_| refuse(EINVAL, format!("endpoint={value}")))?;
                conf.peers[i].endpoint = Some(e);
                change.endpoints.insert(conf.peers[i].public_key);
            }
            "persistent_keepalive_interval" => {
                let s = value.parse::<u16>().map_err(|_| {
                    refuse(EINVAL, format!("persistent_keepalive_interval={value}"))
                })?;
                conf.peers[i].persistent_keepalive = (s != 0).then_some(s);
            }
            "replace_allowed_ips" => {
                bool_true(key, value)?;
                conf.peers[i].allowed_ips.clear();
            }
            "allowed_ip" => {
                let p = value
                    .parse::<Prefix>()
                    .map_err(|_| refuse(EINVAL, format!("allowed_ip={value}")))?;
                for other in conf.peers.iter_mut() {
                    other.allowed_ips.retain(|q| *q != p);
                }
                conf.peers[i].allowed_ips.push(p);
            }
            _ => return Err(refuse(EINVAL, format!("unknown peer key {key:?}"))),
        }
    }
    change.conf = conf;
    Ok(change)
}

/// What `wg show` reports of a peer besides its configuration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerReport {
    pub endpoint: Option<SocketAddr>,
    /// Its latest handshake, since the Unix epoch (0 if none).
    pub last_handshake_ns: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// The answer to `get=1` (without the `errno=0` line): the interface
/// (`listen_port` is the port it is bound to) and `conf`'s peers, each
/// with its report.
pub fn format_get(conf: &WgConf, listen_port: u16, reports: &[PeerReport]) -> String {
    let mut s = String::new();
    if let Some(k) = &conf.private_key {
        let _ = writeln!(s, "private_key={}", hex(k.bytes()));
    }
    if listen_port != 0 {
        let _ = writeln!(s, "listen_port={listen_port}");
    }
    if let Some(m) = conf.fwmark {
        let _ = writeln!(s, "fwmark={m}");
    }
    for (p, r) in conf.peers.iter().zip(reports) {
        let _ = writeln!(s, "public_key={}", hex(&p.public_key.0));
        let psk = p
            .preshared_key
            .as_ref()
            .map(|k| *k.bytes())
            .unwrap_or([0; 32]);
        let _ = writeln!(s, "preshared_key={}", hex(&psk));
        s.push_str("protocol_version=1\n");
        if let Some(e) = r.endpoint {
            let _ = writeln!(s, "endpoint={}", crate::types::canonical(e));
        }
        let _ = writeln!(
            s,
            "last_handshake_time_sec={}\nlast_handshake_time_nsec={}",
            r.last_handshake_ns / 1_000_000_000,
            r.last_handshake_ns % 1_000_000_000
        );
        let _ = writeln!(s, "tx_bytes={}\nrx_bytes={}", r.tx_bytes, r.rx_bytes);
        let _ = writeln!(
            s,
            "persistent_keepalive_interval={}",
            p.persistent_keepalive.unwrap_or(0)
        );
        for a in &p.allowed_ips {
            let _ = writeln!(s, "allowed_ip={a}");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> (Secret, PublicKey) {
        let s = Secret::generate().unwrap();
        let p = s.public_key();
        (s, p)
    }

    fn empty() -> WgConf {
        WgConf {
            private_key: Some(key().0),
            listen_port: Some(51820),
            fwmark: None,
            peers: Vec::new(),
        }
    }

    fn set(conf: &WgConf, text: &str) -> Result<Change, Refused> {
        let lines: Vec<&str> = text.lines().collect();
        apply_set(conf, &lines)
    }

    #[test]
    fn peers_added_updated_moved_and_removed() {
        let conf = empty();
        let (a, b) = (key().1, key().1);
        let c = set(
            &conf,
            &format!(
                "listen_port=51821\nfwmark=7\npublic_key={}\nendpoint=198.18.0.2:51820\n\
                 allowed_ip=198.19.0.0/24\nallowed_ip=2001:db8::/64\npersistent_keepalive_interval=25\n\
                 public_key={}\nallowed_ip=198.19.1.0/24",
                hex(&a.0),
                hex(&b.0)
            ),
        )
        .unwrap();
        assert_eq!((c.listen_port, c.fwmark), (Some(51821), Some(7)));
        assert_eq!(c.conf.peers.len(), 2);
        assert_eq!(c.conf.peers[0].persistent_keepalive, Some(25));
        assert_eq!(c.endpoints, HashSet::from([a]));
        // b takes a's IPv4 prefix (appended); a keeps the rest.
        let c2 = set(
            &c.conf,
            &format!("public_key={}\nallowed_ip=198.19.0.0/24", hex(&b.0)),
        )
        .unwrap();
        let ips = |c: &Change, i: usize| -> Vec<String> {
            c.conf.peers[i]
                .allowed_ips
                .iter()
                .map(|p| p.to_string())
                .collect()
        };
        assert_eq!(ips(&c2, 0), ["2001:db8::/64"]);
        assert_eq!(ips(&c2, 1), ["198.19.1.0/24", "198.19.0.0/24"]);
        // Replaced, then a removed, an unknown peer not created.
        let c3 = set(
            &c2.conf,
            &format!(
                "public_key={}\nreplace_allowed_ips=true\nallowed_ip=198.19.5.0/24\n\
                 public_key={}\nremove=true\npublic_key={}\nupdate_only=true\nallowed_ip=198.19.9.0/24",
                hex(&b.0),
                hex(&a.0),
                hex(&key().1.0)
            ),
        )
        .unwrap();
        assert_eq!(c3.conf.peers.len(), 1);
        assert_eq!(ips(&c3, 0), ["198.19.5.0/24"]);
        // replace_peers empties; our own key is ignored.
        let own = c3.conf.private_key.as_ref().unwrap().public_key();
        let c4 = set(
            &c3.conf,
            &format!(
                "replace_peers=true\npublic_key={}\nallowed_ip=198.19.7.0/24",
                hex(&own.0)
            ),
        )
        .unwrap();
        assert!(c4.conf.peers.is_empty());
    }

    #[test]
    fn bad_lines_are_refused_with_the_protocols_numbers() {
        let conf = empty();
        let a = hex(&key().1.0);
        for (text, errno) in [
            ("garbage".to_string(), EPROTO),
            ("nonsense=1".to_string(), EINVAL),
            ("listen_port=65536".to_string(), EINVAL),
            ("private_key=00".to_string(), EINVAL),
            (format!("public_key={a}\nallowed_ip=198.19.0.0/33"), EINVAL),
            (format!("public_key={a}\nendpoint=nowhere"), EINVAL),
            (format!("public_key={a}\nremove=yes"), EINVAL),
            (format!("public_key={a}\nprotocol_version=2"), EINVAL),
            (format!("public_key={a}\nlisten_port=1"), EINVAL),
            ("public_key=xyz".to_string(), EINVAL),
        ] {
            assert_eq!(set(&conf, &text).unwrap_err().errno, errno, "{text}");
        }
    }

    #[test]
    fn get_lists_the_interface_and_each_peer() {
        let mut conf = empty();
        let (a, psk) = (key().1, key().0);
        let c = set(
            &conf,
            &format!(
                "public_key={}\npreshared_key={}\nendpoint=[2001:db8::2]:51820\nallowed_ip=198.19.0.0/24",
                hex(&a.0),
                hex(psk.bytes())
            ),
        )
        .unwrap();
        conf = c.conf;
        let text = format_get(
            &conf,
            51820,
            &[PeerReport {
                endpoint: Some("[2001:db8::2]:51820".parse().unwrap()),
                last_handshake_ns: 1_700_000_000_123_456_789,
                rx_bytes: 10,
                tx_bytes: 20,
            }],
        );
        let want = format!(
            "private_key={}\nlisten_port=51820\npublic_key={}\npreshared_key={}\nprotocol_version=1\n\
             endpoint=[2001:db8::2]:51820\nlast_handshake_time_sec=1700000000\n\
             last_handshake_time_nsec=123456789\ntx_bytes=20\nrx_bytes=10\n\
             persistent_keepalive_interval=0\nallowed_ip=198.19.0.0/24\n",
            hex(conf.private_key.as_ref().unwrap().bytes()),
            hex(&a.0),
            hex(psk.bytes())
        );
        assert_eq!(text, want);
        // What get prints, set takes back to the same peers.
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| {
                !l.starts_with("last_handshake") && !l.starts_with("tx_") && !l.starts_with("rx_")
            })
            .collect();
        let again = apply_set(&empty(), &lines).unwrap();
        assert_eq!(
            format_get(&again.conf, 51820, &[PeerReport::default()])
                .lines()
                .count(),
            11
        );
    }
}
