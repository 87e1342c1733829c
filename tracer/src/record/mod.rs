//! Recordings: `tracer record` writes the analysis inputs to a file,
//! `tracer report` and `tracer export` read them back. See
//! docs/recording-format.md.

pub mod codec;
pub mod format;
pub mod reader;
pub mod writer;

#[cfg(test)]
mod fuzz_tests;
#[cfg(test)]
mod replay_tests;
#[cfg(test)]
pub(crate) mod synth;
