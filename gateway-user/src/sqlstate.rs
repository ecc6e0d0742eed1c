//! The SQLSTATEs pgward answers with itself, and those it recognizes in the server's answers
//! (PostgreSQL's codes, Appendix A of its documentation).

/// Class 08: the connection to the database server was lost.
pub const CONNECTION_FAILURE: &str = "08006";
/// Class 08: a malformed message or a message out of order.
pub const PROTOCOL_VIOLATION: &str = "08P01";
/// Class 0A: an unsupported protocol version.
pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
/// Class 22: SQL text that is not valid in the client's encoding.
pub const CHARACTER_NOT_IN_REPERTOIRE: &str = "22021";
/// Class 22: a startup parameter pgward does not accept, or a role `SET ROLE` cannot set.
pub const INVALID_PARAMETER_VALUE: &str = "22023";
/// Class 28: no such user, a user other than the token's, or an expired or withdrawn grant.
pub const INVALID_AUTHORIZATION_SPECIFICATION: &str = "28000";
/// Class 28: the token is invalid, expired or revoked.
pub const INVALID_PASSWORD: &str = "28P01";
/// Class 42: refused by the policy.
pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
/// duplicate_prepared_statement: a Parse of a name the session already has a statement under.
pub const DUPLICATE_PREPARED_STATEMENT: &str = "42P05";
/// Class 42: the function does not exist.
pub const UNDEFINED_FUNCTION: &str = "42883";
/// Class 53: the gateway's buffer budget has no room for a message now.
pub const OUT_OF_MEMORY: &str = "53200";
/// Class 54: a message longer than `server.max_message_bytes`.
pub const PROGRAM_LIMIT_EXCEEDED: &str = "54000";
/// Class 58: the audit log cannot take the record.
pub const IO_ERROR: &str = "58030";
