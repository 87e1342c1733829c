//! What the bench's programs share: `tracer-bench` (the cost bench,
//! src/main.rs) and `tracer-soak` (the long run, src/soak/) both start,
//! watch and stop child processes the same way.

pub mod procs;
