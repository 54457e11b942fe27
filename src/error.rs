//! Setup and runtime errors that name the operation and the object.
//!
//! Hot-path failures are never errors: they are counted as drops. An [`Error`]
//! ends the program with one line such as
//! `open TUN queue 2 of tun0: Operation not permitted (os error 1) (need CAP_NET_ADMIN)`.

use std::fmt;
use std::io;

#[derive(Debug)]
pub struct Error {
    /// What was being done, to which object: "bind UDP socket 0.0.0.0:5000".
    context: String,
    /// The OS error, if one caused this.
    source: Option<io::Error>,
    /// What the user can do about it.
    hint: Option<String>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An OS error while doing `context`. Permission errors get the
    /// CAP_NET_ADMIN hint automatically.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        let hint = match source.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => {
                Some("need root or CAP_NET_ADMIN".to_string())
            }
            _ => None,
        };
        Error {
            context: context.into(),
            source: Some(source),
            hint,
        }
    }

    /// A configuration problem found before touching the OS.
    pub fn config(message: impl Into<String>) -> Self {
        Error {
            context: message.into(),
            source: None,
            hint: None,
        }
    }

    /// Replaces the hint.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// The errno behind this error, if any.
    pub fn raw_os_error(&self) -> Option<i32> {
        self.source.as_ref().and_then(io::Error::raw_os_error)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.context)?;
        if let Some(e) = &self.source {
            write!(f, ": {e}")?;
        }
        if let Some(h) = &self.hint {
            write!(f, " ({h})")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

/// Adds context to `io::Result`s: `file.read(..).context(|| "read tun0")?`.
pub trait Context<T> {
    fn context<S: Into<String>>(self, f: impl FnOnce() -> S) -> Result<T>;
}

impl<T> Context<T> for io::Result<T> {
    fn context<S: Into<String>>(self, f: impl FnOnce() -> S) -> Result<T> {
        self.map_err(|e| Error::io(f(), e))
    }
}

impl<T> Context<T> for nix::Result<T> {
    fn context<S: Into<String>>(self, f: impl FnOnce() -> S) -> Result<T> {
        self.map_err(|e| Error::io(f(), io::Error::from(e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_operation_object_and_hint() {
        let e = Error::io(
            "open TUN queue 2 of tun0",
            io::Error::from_raw_os_error(libc::EPERM),
        );
        let s = e.to_string();
        assert!(s.starts_with("open TUN queue 2 of tun0: "), "{s}");
        assert!(s.ends_with("(need root or CAP_NET_ADMIN)"), "{s}");
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
    }

    #[test]
    fn config_error_has_no_source() {
        let e = Error::config("MTU 20 out of range").with_hint("use 68..=65507");
        assert_eq!(e.to_string(), "MTU 20 out of range (use 68..=65507)");
        assert_eq!(e.raw_os_error(), None);
    }
}
