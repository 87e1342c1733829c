use which::which;

/// Rebuild when bpf-linker changes (for instance after `cargo xtask setup`
/// reinstalled it against another LLVM): it links every object we produce.
fn main() {
    let linker = which("bpf-linker").expect("bpf-linker not found in PATH; run `cargo xtask setup` to install it");
    println!("cargo:rerun-if-changed={}", linker.to_str().expect("path is UTF-8"));
}
