//! Tests on memory recorded from real JDK 17 processes running
//! testdata/Spin.java (see live_tests.rs for how the fixtures are made,
//! fixture.rs for what is expected of them).

use super::{
    fixture::{check_chain, compiled_chains, interpreted_chains, load, marker_line, symbols, unhex, Fixture},
    layout::Layout,
    memory::Replay,
    method::read_method,
    ptrace::RawFrame,
    vmstructs::VmStructs,
    JavaFrameKind, Jvm, JvmPc,
};

/// One recorded input named again from the recorded bytes.
struct Replayed {
    thread: String,
    raw: RawFrame,
    synthetic: Option<String>,
    named: JvmPc,
}

/// Names every recorded input again; each must come out as it did live.
fn replay(name: &str) -> (Fixture, Jvm, Vec<Replayed>) {
    let (fixture, mem) = load(name);
    let mut jvm = Jvm::from_memory(Box::new(mem), &symbols(&fixture)).expect("tables from recorded memory");
    let mut out = Vec::new();
    for f in &fixture.frames {
        let raw = RawFrame {
            pc: unhex(&f.pc),
            fp: unhex(&f.fp),
            method_slot: unhex(&f.method_slot),
            bcp_slot: unhex(&f.bcp_slot),
        };
        let named = jvm.name_pc(raw.pc, raw.method_slot, raw.bcp_slot);
        assert_eq!(
            format!("{named:?}"),
            f.named,
            "replay differs from the live run at {}",
            f.pc
        );
        out.push(Replayed {
            thread: f.thread.clone(),
            raw,
            synthetic: f.synthetic.clone(),
            named,
        });
    }
    (fixture, jvm, out)
}

/// The names of the real (not made up) frames of one thread's walk.
fn real(frames: &[Replayed], thread: &str) -> Vec<JvmPc> {
    frames
        .iter()
        .filter(|f| f.synthetic.is_none() && f.thread == thread)
        .map(|f| f.named.clone())
        .collect()
}

#[test]
fn reads_vmstructs_tables_from_recorded_jvm() {
    let (fixture, mem) = load("interpreted");
    let vm = VmStructs::read(&mem, &symbols(&fixture)).unwrap();
    let (fields, types, constants) = vm.counts();
    assert!(fields > 500 && types > 500 && constants > 100, "{:?}", vm.counts());
    let cm = vm.size("ConstMethod").unwrap();
    assert!((16..512).contains(&cm), "sizeof(ConstMethod) = {cm}");
    assert!(vm.offset("Method", "_constMethod").unwrap() > 0);
    assert!(vm.offset("Symbol", "_length").unwrap() < vm.offset("Symbol", "_body").unwrap());
    // Declared on CompiledMethod, found through nmethod's superclass.
    assert_eq!(vm.offset("nmethod", "_method"), vm.offset("CompiledMethod", "_method"));
    assert!(vm.offset("nmethod", "_method").is_some());
    assert!(vm.static_address("CodeCache", "_heaps").is_some());
    assert_eq!(vm.offset("CodeCache", "_heaps"), None, "static, not an offset");
    assert_eq!(vm.int_constant("InvocationEntryBci"), Some(-1));
    let bit = vm.int_constant("ConstMethod::_has_linenumber_table").unwrap();
    assert!(bit > 0 && (bit & (bit - 1)) == 0, "a single flag bit: {bit}");
    let l = Layout::resolve(&vm).unwrap();
    assert!(l.heap_block_used.is_some());
}

#[test]
fn names_interpreted_frames_from_recorded_jvm() {
    let (fixture, mut jvm, frames) = replay("interpreted");
    assert!(fixture.jvm_args.contains(&"-Xint".to_string()));
    // -Xint: one code heap, not segmented.
    assert_eq!(jvm.code_cache.heap_count(), 1);
    assert!(!fixture.preserve_frame_pointer && !jvm.preserves_frame_pointer());
    for (thread, want) in interpreted_chains() {
        let named = real(&frames, thread);
        check_chain(&named, &want).unwrap();
        // The threads came from libjvm: native frames are left to blazesym,
        // and the call stub between them and Java is a stub.
        assert!(named.contains(&JvmPc::Native), "{thread}");
        assert!(named.contains(&JvmPc::Stub("StubRoutines (1)".into())), "{thread}");
    }

    let middle = frames
        .iter()
        .find(|f| f.synthetic.is_none() && matches!(&f.named, JvmPc::Java(j) if j[0].method == "middle"))
        .map(|f| f.raw)
        .unwrap();
    // Without a valid Method* the interpreter is only a stub...
    let interpreter = JvmPc::Stub("Interpreter".into());
    assert_eq!(jvm.name_pc(middle.pc, 0, middle.bcp_slot), interpreter);
    assert_eq!(jvm.name_pc(middle.pc, 0x1234_5671, middle.bcp_slot), interpreter);
    // ...and a bcp outside the bytecodes gives no bci or line, but the names.
    let JvmPc::Java(f) = jvm.name_pc(middle.pc, middle.method_slot, 8) else {
        panic!("no Java frame")
    };
    assert_eq!((f[0].method.as_str(), f[0].bci, f[0].line), ("middle", None, None));
}

#[test]
fn line_table_of_a_recorded_method() {
    let (fixture, mem) = load("interpreted");
    let vm = VmStructs::read(&mem, &symbols(&fixture)).unwrap();
    let l = Layout::resolve(&vm).unwrap();
    let middle = fixture
        .frames
        .iter()
        .find(|f| f.synthetic.is_none() && f.named.contains("method: \"middle\""))
        .unwrap();
    let m = read_method(&mem, &l, unhex(&middle.method_slot)).unwrap();
    assert_eq!((m.class.as_str(), m.name.as_str()), ("jvmtest.Spin", "middle"));
    assert_eq!(m.signature, "(Ljava/lang/String;[I)V");
    assert_eq!(m.file.as_deref(), Some("Spin.java"));
    let bci = m.bci_from_bcp(&l, unhex(&middle.bcp_slot)).unwrap();
    assert_eq!(m.line(&mem, bci), Some(marker_line("@middle-call")));
    // bci 0 (`int i = 0`) belongs to the loop header line.
    assert_eq!(m.line(&mem, 0), Some(marker_line("@middle-loop")));
    assert_eq!(m.line(&mem, -1), None);
    assert_eq!(m.line(&mem, 1 << 16), None);
}

#[test]
fn names_compiled_and_inlined_frames_from_recorded_jvm() {
    let (fixture, jvm, frames) = replay("compiled");
    assert!(fixture.preserve_frame_pointer);
    // Tiered: the segmented code cache (non-nmethods, profiled, non-profiled).
    assert_eq!(jvm.code_cache.heap_count(), 3);
    for (thread, want) in compiled_chains() {
        check_chain(&real(&frames, thread), &want).unwrap();
    }
    // pc-1 of a compiled call site is no return address: the walk is cut.
    let broken_at = |symbol: &str| {
        frames.iter().any(|f| {
            f.synthetic.as_deref() == Some("pc-1")
                && matches!(&f.named, JvmPc::Broken(why)
                    if why.contains(&format!("is not a call site of compiled method {symbol}:")))
        })
    };
    assert!(broken_at("jvmtest.Spin.outer(String, int[])"));
    assert!(broken_at("jvmtest.Spin$Yielder.run()"));
    // A return address patched to the deopt handler names the method only.
    let deopt: Vec<&JvmPc> = frames
        .iter()
        .filter(|f| f.synthetic.as_deref() == Some("deopt"))
        .map(|f| &f.named)
        .collect();
    let outer = deopt.iter().find_map(|n| match n {
        JvmPc::Java(f) if f.len() == 1 && f[0].method == "outer" => Some(&f[0]),
        _ => None,
    });
    let outer = outer.expect("outer's nmethod, deoptimized, is named");
    assert_eq!(
        (outer.kind, outer.bci, outer.line),
        (JavaFrameKind::Compiled, None, None)
    );
}

/// Memory that corrupts a pseudo-random ~1/32 of the bytes it returns
/// once armed (the same bytes for the same seed, like a consistent but
/// wrong heap), to show that garbage never panics or hangs the naming.
struct Corrupting {
    inner: Replay,
    seed: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl super::memory::Memory for Corrupting {
    fn read(&self, addr: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.inner.read(addr, buf)?;
        let seed = self.seed.load(std::sync::atomic::Ordering::Relaxed);
        if seed != 0 {
            for (i, b) in buf.iter_mut().enumerate() {
                let mut h = (addr + i as u64) ^ seed;
                h = (h ^ (h >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
                h ^= h >> 29;
                if h.is_multiple_of(32) {
                    *b ^= (h >> 8) as u8 | 1;
                }
            }
        }
        Ok(())
    }
}

#[test]
fn corrupted_memory_and_garbage_inputs_never_panic() {
    for name in ["interpreted", "compiled"] {
        let (fixture, mem) = load(name);
        let seed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mem = Corrupting {
            inner: mem,
            seed: seed.clone(),
        };
        let mut jvm = Jvm::from_memory(Box::new(mem), &symbols(&fixture)).unwrap();
        let inputs: Vec<(u64, u64, u64)> = fixture
            .frames
            .iter()
            .map(|f| (unhex(&f.pc), unhex(&f.method_slot), unhex(&f.bcp_slot)))
            .collect();
        let clean: Vec<JvmPc> = inputs.iter().map(|&(pc, m, bcp)| jvm.name_pc(pc, m, bcp)).collect();
        let (mut changed, mut total) = (0, 0);
        for s in 1..=300u64 {
            seed.store(
                s.wrapping_mul(0x9e37_79b9_7f4a_7c15),
                std::sync::atomic::Ordering::Relaxed,
            );
            for (&(pc, m, bcp), clean) in inputs.iter().zip(&clean) {
                // Results vary; what matters is that each call returns.
                total += 1;
                if jvm.name_pc(pc, m, bcp) != *clean {
                    changed += 1;
                }
                let _ = jvm.name_pc(pc ^ (s << 3), m ^ s, bcp.wrapping_add(s));
            }
        }
        // The corruption does reach the decoding (it is not all masked).
        assert!(changed * 4 > total, "{name}: only {changed} of {total} results changed");
        // Arbitrary words as inputs, on clean memory.
        seed.store(0, std::sync::atomic::Ordering::Relaxed);
        for &v in &[0, 1, u64::MAX, u64::MAX - 7, 1 << 63, 0x7fff_ffff_ffff] {
            let _ = jvm.name_pc(v, v, v);
            for &(pc, _, _) in &inputs {
                let _ = jvm.name_pc(pc, v, v);
            }
        }
    }
    // Tables read from corrupted memory: attach fails or succeeds, never panics.
    let (fixture, mem) = load("interpreted");
    let seed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mem = Corrupting { inner: mem, seed };
    for s in 1..=20u64 {
        mem.seed.store(s, std::sync::atomic::Ordering::Relaxed);
        let _ = VmStructs::read(&mem, &symbols(&fixture)).map(|vm| Layout::resolve(&vm));
    }
}
