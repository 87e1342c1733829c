//! Names HotSpot (JDK 17, x86_64) Java frames from outside a live JVM.
//!
//! Input per frame: its return address and two words the kernel read from
//! the frame, `[fp-24]` (an interpreter frame's `Method*`) and `[fp-64]`
//! (its bytecode pointer). Every structure offset comes from the JVM's own
//! vmStructs tables, read from the process at attach; nothing per-JDK is
//! compiled in.
//!
//! Files: `symbols` finds libjvm.so and its exported table symbols,
//! `vmstructs` reads the tables, `layout` resolves the offsets used here,
//! `codecache` maps a pc to a code blob, `method` names a `Method*`,
//! `nmethod` decodes compiled frames and their inlining, `flags` reads
//! `-XX` flags, `compressed` and `descriptor` are the pure decoders.
//! Tests: `live_tests` runs testdata/Spin.java in a real JVM and walks its
//! threads with `ptrace`; `replay_tests` replays memory recorded from it
//! (testdata/*.mem, *.json; expectations in `fixture`).
//!
//! What is not handled: a return address patched to a deopt handler names
//! the method without a line; native wrappers are `Compiled` frames without
//! a bci; a `Method*` slot that points into reused metaspace can in theory
//! pass the checks (pool holder pointing back at its pool, sane symbols).

mod codecache;
mod compressed;
mod descriptor;
mod flags;
mod layout;
mod memory;
mod method;
mod nmethod;
mod symbols;
mod vmstructs;

#[cfg(test)]
mod fixture;
#[cfg(test)]
mod live_tests;
#[cfg(test)]
mod ptrace;
#[cfg(test)]
mod replay_tests;

use anyhow::anyhow;

use self::{
    codecache::{CodeCache, Lookup},
    layout::Layout,
    memory::{Memory, ProcMem},
    symbols::Symbols,
    vmstructs::VmStructs,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JavaFrameKind {
    Interpreted,
    Compiled,
    Inlined,
    /// The compiled wrapper through which a `native` Java method is called
    /// (no bci, no line). Unlike other compiled code it always keeps a
    /// frame pointer, so the walk above it can be trusted.
    NativeMethod,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JavaFrame {
    /// Dotted, e.g. "sun.net.www.protocol.http.HttpURLConnection".
    pub class: String,
    /// E.g. "getInputStream0".
    pub method: String,
    /// JVM descriptor, e.g. "(Ljava/lang/String;)V".
    pub signature: String,
    /// "Class.method(ParamTypes)", parameters as simple Java type names,
    /// e.g. "a.b.C.m(int, byte[])".
    pub symbol: String,
    /// Source file name from the class, e.g. "Meta.java".
    pub file: Option<String>,
    /// From the line-number table; None without a table or a known bci.
    pub line: Option<u32>,
    pub bci: Option<i32>,
    pub kind: JavaFrameKind,
}

/// What a pc in a JVM is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JvmPc {
    /// Not in the code cache: let the native symbolizer (blazesym) name it.
    Native,
    /// Java frames for this pc, innermost first (inlined ones first, then
    /// the compiled/interpreted method itself).
    Java(Vec<JavaFrame>),
    /// A code-cache blob that is not a Java method (stub, adapter,
    /// "Interpreter" without a valid Method*, ...): its blob name, e.g.
    /// "StubRoutines (1)".
    Stub(String),
    /// In the code cache but cannot be trusted/named; the String says why.
    /// The caller cuts the stack here.
    Broken(String),
}

/// One JVM process: its tables, read once at attach.
pub struct Jvm {
    mem: Box<dyn Memory + Send>,
    layout: Layout,
    code_cache: CodeCache,
    preserve_frame_pointer: bool,
    /// The code of the "Interpreter" blob, once a frame in it was named:
    /// created at start-up, it never moves.
    interpreter: Option<(u64, u64)>,
}

impl Jvm {
    /// Ok(None) when the process does not map libjvm.so. Err (with a
    /// one-line reason) when it does but the tables can't be read.
    pub fn attach(pid: u32) -> anyhow::Result<Option<Jvm>> {
        let one_line = |e: anyhow::Error| anyhow!("JVM {pid}: {e:#}");
        let Some(lib) = symbols::find_libjvm(pid).map_err(one_line)? else {
            return Ok(None);
        };
        let syms = symbols::resolve(&lib).map_err(one_line)?;
        let mem = ProcMem::open(pid).map_err(|e| anyhow!("JVM {pid}: opening /proc/{pid}/mem: {e}"))?;
        Jvm::from_memory(Box::new(mem), &syms).map(Some).map_err(one_line)
    }

    /// Reads the tables through `mem`, given where libjvm's table symbols
    /// are (split from `attach` so tests can replay recorded memory).
    fn from_memory(mem: Box<dyn Memory + Send>, syms: &Symbols) -> anyhow::Result<Jvm> {
        let vm = VmStructs::read(&*mem, syms)?;
        let layout = Layout::resolve(&vm)?;
        let preserve_frame_pointer = match flags::read_bool(&*mem, &vm, "PreserveFramePointer") {
            Ok(Some(v)) => v,
            Ok(None) => false,
            Err(e) => {
                // Not fatal: assuming "no" only makes the caller distrust
                // frame-pointer chains above compiled frames.
                log::debug!("cannot read PreserveFramePointer: {e:#}");
                false
            }
        };
        Ok(Jvm {
            mem,
            layout,
            code_cache: CodeCache::default(),
            preserve_frame_pointer,
            interpreter: None,
        })
    }

    /// Whether the JVM runs with -XX:+PreserveFramePointer (read from the
    /// JVM's flag table). When false, the frame-pointer chain above a
    /// compiled (non-native-wrapper) frame cannot be trusted.
    pub fn preserves_frame_pointer(&self) -> bool {
        self.preserve_frame_pointer
    }

    /// Whether `pc` is in the interpreter, the only code whose frames'
    /// `Method*` and bcp slots mean anything; None until a frame in the
    /// interpreter has been named (its bounds are learnt then).
    pub fn is_interpreter(&self, pc: u64) -> Option<bool> {
        self.interpreter.map(|(begin, end)| begin <= pc && pc < end)
    }

    /// Names one frame. `method_slot` and `bcp_slot` are the words at
    /// [fp-24] and [fp-64] of THIS frame (0 when unknown).
    pub fn name_pc(&mut self, pc: u64, method_slot: u64, bcp_slot: u64) -> JvmPc {
        let mem: &dyn Memory = &*self.mem;
        let l = &self.layout;
        let blob = match self.code_cache.find(mem, l, pc) {
            Lookup::Outside => return JvmPc::Native,
            Lookup::Broken(why) => return JvmPc::Broken(why),
            Lookup::Blob(b) => b,
        };
        if blob.name == "Interpreter" {
            self.interpreter = Some((blob.code_begin, blob.code_end));
        }
        match blob.name.as_str() {
            // Every interpreted frame runs in this one blob; the frame's
            // slots say which method and where in it.
            "Interpreter" => match method::read_method(mem, l, method_slot) {
                Ok(m) => JvmPc::Java(vec![m.frame(
                    mem,
                    m.bci_from_bcp(l, bcp_slot),
                    JavaFrameKind::Interpreted,
                )]),
                Err(why) => {
                    log::debug!("interpreter frame at pc {pc:#x}: {why}");
                    JvmPc::Stub(blob.name)
                }
            },
            "nmethod" | "native nmethod" => nmethod::name(mem, l, &blob, pc),
            _ => JvmPc::Stub(blob.name),
        }
    }
}
