//! Postgres wire protocol v3: reading whole messages as raw `Bytes` ([`frame`]), under the
//! limits and the memory budget of a relayed session ([`inbound`], [`budget`]), the
//! zero-copy decoders of what pgward reads ([`decode`]), builders for the messages pgward sends
//! itself ([`build`]), and the protocol state both directions of a session share ([`tracker`]:
//! prepared statements, portals, the answers the server owes, the transaction status), with
//! each prepared statement's parameter types ([`param_types`]), and binary-format values as
//! Postgres prints them ([`binary`]). `wire` knows frames, not policy.

pub mod binary;
pub mod budget;
mod build;
mod decode;
mod frame;
mod inbound;
mod param_types;
mod reader;
mod startup;
mod stream;
pub mod tracker;

pub use build::*;
pub use decode::*;
pub use frame::*;
pub use inbound::*;
pub use param_types::ParamTypes;
pub use reader::*;
pub use startup::*;
pub use stream::*;
pub use tracker::{Awaited, Tracker};

#[cfg(test)]
mod fuzz_tests;
#[cfg(test)]
mod tests;
