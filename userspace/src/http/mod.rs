//! The HTTP endpoints: health, readiness, Prometheus metrics, the counter API, statistics, CPU
//! profiles and a live dashboard, served by their own threads off the packet path.

mod connection;
mod history;
pub mod pending;
pub mod profile;
pub mod request;
pub mod routes;
pub mod server;
pub mod state;

pub use routes::Access;
pub use server::{HttpBound, HttpConfig, HttpListen, HttpServer};
pub use state::{AppState, HistoryView, WorkerView, XskLive};
