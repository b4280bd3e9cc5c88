//! ricochet: a Linux packet responder. A client sends a small request; ricochet verifies it, counts
//! it and answers, on the datapath the operator chose.
//!
//! The crate is layered: [`wire`] (checked views over the protocol bytes), [`core`] (the sans-IO
//! responder every datapath shares), [`stats`] (lock-free per-worker records), then one module per
//! datapath ([`kernel`]) and the commands ([`serve`], [`bench`]). Unsafe code lives in [`sys`] only.
#![deny(unsafe_code)]

pub mod afxdp;
pub mod bench;
pub mod core;
pub mod fuzzing;
pub mod http;
pub mod hw;
pub mod kernel;
pub mod net;
pub mod serve;
pub mod spec;
pub mod stats;
pub mod sys;
pub mod wire;
pub mod xdp;
