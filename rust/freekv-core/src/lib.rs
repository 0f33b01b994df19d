//! freekv-core: the host side of FreeKV's KV offload (pure Rust, no Python).
#![deny(unsafe_op_in_unsafe_fn)]

/// Crate version, exposed to Python for diagnostics.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
