//! The audit log: append-only, hash-chained JSON lines with signed checkpoints.
//! Sessions append through [`AuditHandle`]; writer threads write and sync the segment
//! files (group commit). [`reader`] reads (and follows) the log, [`verify`] checks it.

pub mod against;
pub mod anchor;
pub mod chain;
pub mod links;
pub mod reader;
pub mod export;
pub mod param;
pub mod record;

pub use export::{ExportKind, Exporter};
pub mod verify;
mod writer;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod loop_tests;

pub use param::Param;
pub use record::{Client, Kind, Record};
pub use writer::{AuditError, AuditHandle, CheckpointHook, CheckpointSigner, OnDurable, Outcome, Waiter, WriterOptions, WriterStats, last_line};
