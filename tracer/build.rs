//! Builds the eBPF programs (tracer-ebpf) for the BPF target with the pinned
//! nightly toolchain, so `cargo build` of the agent is the whole build.

/// The exact nightly whose LLVM (22.1) matches bpf-linker's. A newer nightly
/// could emit bitcode bpf-linker cannot read. `cargo xtask setup` installs it.
const EBPF_TOOLCHAIN: &str = "nightly-2026-05-20";

fn main() -> anyhow::Result<()> {
    let ebpf = aya_build::Package {
        name: "tracer-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../tracer-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::Custom(EBPF_TOOLCHAIN))
}
