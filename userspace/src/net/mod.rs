//! Sockets below every server: binding listeners ([`bind`]) and accepting stream connections
//! ([`accept`]). The kernel datapath and the HTTP server both build on this; neither owns it.

mod accept;
mod bind;

pub use accept::{Accepted, Listeners, StreamListener, PAUSE};
pub use bind::{bind_tcp_group, bind_udp_group, bind_unix, UnixEndpoint};
