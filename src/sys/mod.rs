//! The few places that call libc directly.
//!
//! Everything here is a thin, typed wrapper around one system call whose
//! arguments the safe standard library or nix do not cover (interface ioctls).
//! Each `unsafe` block names the invariant it relies on.

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
pub use linux::*;

#[cfg(target_os = "macos")]
mod macos;
#[cfg(target_os = "macos")]
pub use macos::*;
