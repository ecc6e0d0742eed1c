//! The audit log: append-only, hash-chained JSON lines with signed checkpoints.
//! One writer thread owns the segment file (group commit); sessions talk to it via
//! [`AuditHandle`]. [`reader`] reads (and follows) the log, [`verify`] checks it.

pub mod chain;
pub mod reader;
pub mod export;
pub mod record;

pub use export::{ExportKind, Exporter};
pub mod verify;
mod writer;

#[cfg(test)]
mod tests;

pub use record::{Client, Kind, Record};
pub use writer::{AuditError, AuditHandle, CheckpointSigner, WriterOptions, WriterStats};
