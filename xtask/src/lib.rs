//! What the xtask binary shares with the test suite: building the Debian package (the test that
//! installs it into an isolated root builds it with this same code).

pub mod deb;
