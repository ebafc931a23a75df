//! `benches/exit_handling.rs` still includes this file by path; the code lives in the
//! `test-support` crate (`test_support::guest`). Delete once the bench uses the crate.

pub use test_support::guest::*;
