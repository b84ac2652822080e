//! End-to-end tests of the `duet` binary and library. One test binary, several modules, so the
//! 2-core CI links once.

mod common;
mod malformed;
mod openai;
mod pipeline;
mod reference;
mod tiny;
