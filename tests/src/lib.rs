//! Shared fixtures of the integration tests.
#![forbid(unsafe_code)]
