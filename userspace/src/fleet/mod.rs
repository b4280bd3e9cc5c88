//! The fleet (`serve --fleet URL`): per-second records shipped from each instance's history store
//! ([`crate::history`]) to PostgreSQL, and `ricochet fleet summary` reading them back.
//!
//! Nothing is lost or counted twice:
//! - rows are upserted keyed by (instance, second) with the record's whole value, so a retried or
//!   replayed batch overwrites a row with the same numbers;
//! - a record is marked shipped, at the revision sent, only after the target committed it; a record
//!   rewritten meanwhile (a restart within its second) stays waiting;
//! - while no target answers, records wait in the history store, across restarts and SIGKILL, and
//!   leave oldest first once one answers.
//!
//! Targets: the first `--fleet` is the primary, the rest are fallbacks, tried in order. Each has a
//! circuit breaker ([`breaker`]); health checks every few seconds keep the breakers current, so the
//! shipper returns to the primary once it answers again. The packet path never waits for any of
//! this: the shipper is a thread of its own reading the store.

pub mod breaker;
pub mod schema;
mod shipper;
pub mod summary;
mod target;

pub use shipper::{FleetPlan, FleetStatus, Shipper, TargetStatus, BATCH};
pub use summary::{FleetCommand, FleetSummary};
pub use target::{Target, TargetUrl};
