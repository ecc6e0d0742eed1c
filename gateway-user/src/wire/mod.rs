//! Postgres wire protocol v3: reading whole messages as raw `Bytes` ([`frame`]), the
//! zero-copy decoders of what pgward reads ([`decode`]), and builders for the messages pgward
//! sends itself ([`build`]). `wire` knows frames, not policy.

mod build;
mod decode;
mod frame;
mod reader;
mod startup;
mod stream;

pub use build::*;
pub use decode::*;
pub use frame::*;
pub use reader::*;
pub use startup::*;
pub use stream::*;

#[cfg(test)]
mod tests;
