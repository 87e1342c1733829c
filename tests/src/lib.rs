//! Harness for the `tracer` integration tests.
//!
//! * [`privileges`]: [`require_privileges`], the root check (skip locally,
//!   fail in CI).
//! * [`paths`]: where the `tracer` and `tcp-fixture` binaries are.
//! * [`child`]: [`Child`], a child process that is killed when dropped, with
//!   line-by-line access to its stdout (with timeouts).
//! * [`fixture`]: [`spawn_server`] / [`spawn_client`], the `tcp-fixture`
//!   program.
//! * [`tracer`]: [`run_tracer`] / [`Tracer`] / [`TracerOutput`] / [`Leak`],
//!   `tracer live --json`.
//! * [`http`]: [`http_get`], a plain GET (the daemon's endpoints,
//!   Prometheus's API), and [`free_port`].
//! * [`prometheus`]: [`prometheus::Prometheus`], a real Prometheus server
//!   scraping the daemon, queried through its API.
//! * [`ss`]: [`ss_sockets`] / [`SsMonitor`], ground truth from the kernel
//!   via `ss` (also inside another network namespace, or all of them).
//! * [`netns`]: [`NetNs`], a network namespace of a test's own, and
//!   [`TestCgroup`], a cgroup named as a container runtime names one.
//! * [`evidence`]: [`Evidence`] / [`Group`] / [`Frame`], the root-cause
//!   evidence in leak objects (unread bytes, holders, stacks).
//! * [`procfs`]: ground truth from `/proc` ([`socket_fds`]).
//! * [`addr`]: [`normalize_addr`], the form addresses are compared in.
//! * [`compare`]: [`assert_same_cookies`], set comparison that shows both
//!   differences.
//! * [`reduced`]: `tracer live --json` as uid 65534 with only some
//!   capabilities ([`reduced::run_reduced`], through `setpriv`).
//! * [`recording`]: `tracer record` ([`Recorder`]), `report` / `export`
//!   ([`run_tracer_cmd`]), temporary files, and damaging recordings.

pub mod addr;
pub mod child;
pub mod compare;
pub mod evidence;
pub mod fixture;
pub mod http;
pub mod java;
pub mod java_frames;
pub mod netns;
pub mod paths;
pub mod privileges;
pub mod procfs;
pub mod prometheus;
pub mod recording;
pub mod reduced;
pub mod ss;
pub mod tracer;

pub use serde_json::Value;

pub use addr::{normalize_addr, port_of};
pub use child::{slowed, Child};
pub use compare::assert_same_cookies;
pub use evidence::{format_stack, stack_has, ClosedBy, Evidence, Frame, Group, Holder};
pub use fixture::{
    fixture_command, holder_pid, spawn_client, spawn_client_via, spawn_server, spawn_server_via, start_client,
    start_client_via, wait_client_done, SockLine,
};
pub use http::{free_port, http_get, HttpReply};
pub use netns::{NetNs, TestCgroup};
pub use paths::{fixture_bin, tracer_bin};
pub use privileges::require_privileges;
pub use procfs::socket_fds;
pub use recording::{run_tracer_cmd, start_recorder, Ran, RecordOutput, Recorder, RecordingInfo, TempFile};
pub use ss::{
    format_ss, parse_ss_line, parse_ss_output, ss_sockets, ss_sockets_every_netns, ss_sockets_via, wait_for_ss,
    SsMonitor, SsSocket, SsUser,
};
pub use tracer::{run_daemon, run_tracer, trace_held_client, Leak, Tracer, TracerOutput};
