//! Recordings: `tracer record` writes the analysis inputs to a file,
//! `tracer report` and `tracer export` read them back. See
//! docs/recording-format.md.

pub mod block;
pub mod codec;
pub mod events;
pub mod format;
pub mod reader;
pub mod writer;

#[cfg(test)]
mod compat_tests;
#[cfg(test)]
mod fuzz_tests;
#[cfg(test)]
mod reader_tests;
#[cfg(test)]
mod replay_tests;
#[cfg(test)]
mod rotation_tests;
#[cfg(test)]
pub(crate) mod synth;
