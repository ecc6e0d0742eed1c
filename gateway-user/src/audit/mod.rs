//! The audit log: append-only, hash-chained JSON lines with signed checkpoints.
//! One writer thread owns the segment file (group commit); sessions talk to it via
//! [`AuditHandle`].

pub mod record;

pub use record::{Client, Kind, Record};
