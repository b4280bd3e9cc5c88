//! ricochet: a Linux packet responder. A client sends a small request; ricochet verifies it, counts
//! it and answers, on the datapath the operator chose.
//!
//! The crate is layered; each line below uses only its own line and those above it:
//! - [`wire`] (checked views over the protocol bytes), [`spec`] (configuration values), [`core`]
//!   (the sans-IO responder every datapath shares) and [`stats`] (lock-free statistics records, each
//!   describing its fields once);
//! - [`sys`] (syscalls), [`privilege`] (dropping root after set-up), [`durable`] (the counter's state
//!   directory and snapshots), [`history`] (per-second records in the state directory), [`fleet`]
//!   (shipping them to PostgreSQL), [`net`] (binding and accepting), [`iface`] (interface facts);
//! - the datapaths [`kernel`], [`xdp`] and [`afxdp`], which know nothing of HTTP;
//! - [`http`] (the endpoints, reading statistics records) and [`hw`] (hardware profiles);
//! - the commands [`serve`] (which wires datapaths and endpoints together) and [`bench`].
//!
//! Unsafe code is denied at the crate root and allowed, with a `// SAFETY:` comment per block, in
//! four small modules only: `sys`, `xdp::maps`, `xdp::counter` and `afxdp::umem`.
#![deny(unsafe_code)]

pub mod afxdp;
pub mod bench;
pub mod core;
pub mod durable;
pub mod fleet;
pub mod fuzzing;
pub mod history;
pub mod http;
pub mod hw;
pub mod iface;
pub mod kernel;
pub mod net;
pub mod privilege;
pub mod serve;
pub mod spec;
pub mod stats;
pub mod sys;
pub mod tcp_lite;
pub mod wire;
pub mod xdp;
