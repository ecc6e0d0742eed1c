//! How much SQL pgward parses.
//!
//! Texts over [`MAX_PARSE_BYTES`] are neither parsed nor scanned, and the policy denies them
//! outright (`builtin:too-large`). Depth is bounded where the tree is read
//! ([`super::pgparse::MAX_TREE_DEPTH`]): a deeper statement is treated as unparsable.

/// Longest statement text (a simple-query string or a Parse's text) pgward parses: 1 MiB.
pub const MAX_PARSE_BYTES: usize = 1 << 20;
