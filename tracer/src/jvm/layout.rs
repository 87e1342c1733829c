//! The offsets and sizes this module uses, resolved from [`VmStructs`] once
//! at attach, so naming a frame does no string lookups. A missing required
//! entry fails the attach with its name, which is what to look for in a new
//! JDK's vmStructs.cpp.

use anyhow::anyhow;

use super::vmstructs::VmStructs;

/// No HotSpot structure this module reads is anywhere near this big.
const MAX_OFFSET: u64 = 1 << 16;

#[derive(Clone, Debug)]
pub struct Layout {
    pub method_const_method: u64,

    pub const_method_size: u64,
    pub const_method_constants: u64,
    pub const_method_flags: u64,
    pub const_method_code_size: u64,
    pub const_method_name_index: u64,
    pub const_method_signature_index: u64,
    /// `_constMethod_size`, in words: bounds the line-number table.
    pub const_method_words: u64,
    /// The `_flags` bit saying a line-number table follows the bytecodes.
    pub has_linenumber_table: Option<u16>,

    pub constant_pool_size: u64,
    pub constant_pool_holder: u64,
    pub constant_pool_length: u64,
    pub constant_pool_source_file: Option<u64>,

    pub klass_name: u64,
    /// `InstanceKlass::_constants`: the holder must point back at the pool.
    pub instance_klass_constants: Option<u64>,

    pub symbol_length: u64,
    pub symbol_body: u64,

    pub code_cache_heaps: u64,
    pub code_cache_low_bound: u64,
    pub code_cache_high_bound: u64,
    pub growable_array_len: u64,
    pub growable_array_data: u64,
    pub code_heap_memory: u64,
    pub code_heap_segmap: u64,
    pub code_heap_log2_segment_size: u64,
    pub virtual_space_low_boundary: u64,
    pub virtual_space_high_boundary: u64,
    pub virtual_space_low: u64,
    pub virtual_space_high: u64,
    pub heap_block_size: u64,
    /// `HeapBlock::_header._used`: a freed block's blob must not be named.
    pub heap_block_used: Option<u64>,

    pub code_blob_name: u64,
    pub code_blob_code_begin: u64,
    pub code_blob_code_end: u64,

    pub nmethod_method: u64,
    pub nmethod_scopes_data_begin: u64,
    pub nmethod_scopes_pcs_offset: u64,
    pub nmethod_dependencies_offset: u64,
    pub nmethod_metadata_offset: u64,
    /// Where a deoptimized frame's return address is redirected to.
    pub nmethod_deopt_handlers: Vec<u64>,
    pub pc_desc_size: u64,
    pub pc_desc_pc_offset: u64,
    pub pc_desc_scope_decode_offset: u64,
    pub invocation_entry_bci: i32,
}

impl Layout {
    pub fn resolve(vm: &VmStructs) -> anyhow::Result<Self> {
        // Offsets and sizes are bounded so that pointer + offset arithmetic
        // on them cannot overflow, even when the tables are garbage.
        let field = |ty: &str, f: &str| vm.offset(ty, f).filter(|&o| o < MAX_OFFSET);
        let off = |ty: &str, f: &str| field(ty, f).ok_or_else(|| anyhow!("vmStructs lacks {ty}::{f}"));
        let stat = |ty: &str, f: &str| {
            vm.static_address(ty, f)
                .ok_or_else(|| anyhow!("vmStructs lacks static {ty}::{f}"))
        };
        let size = |ty: &str| {
            vm.size(ty)
                .filter(|&s| s < MAX_OFFSET)
                .ok_or_else(|| anyhow!("vmStructs lacks the size of {ty}"))
        };
        Ok(Layout {
            method_const_method: off("Method", "_constMethod")?,
            const_method_size: size("ConstMethod")?,
            const_method_constants: off("ConstMethod", "_constants")?,
            const_method_flags: off("ConstMethod", "_flags")?,
            const_method_code_size: off("ConstMethod", "_code_size")?,
            const_method_name_index: off("ConstMethod", "_name_index")?,
            const_method_signature_index: off("ConstMethod", "_signature_index")?,
            const_method_words: off("ConstMethod", "_constMethod_size")?,
            has_linenumber_table: vm
                .int_constant("ConstMethod::_has_linenumber_table")
                .and_then(|v| u16::try_from(v).ok()),
            constant_pool_size: size("ConstantPool")?,
            constant_pool_holder: off("ConstantPool", "_pool_holder")?,
            constant_pool_length: off("ConstantPool", "_length")?,
            constant_pool_source_file: field("ConstantPool", "_source_file_name_index"),
            klass_name: off("Klass", "_name")?,
            instance_klass_constants: field("InstanceKlass", "_constants"),
            symbol_length: off("Symbol", "_length")?,
            symbol_body: off("Symbol", "_body").or_else(|_| off("Symbol", "_body[0]"))?,
            code_cache_heaps: stat("CodeCache", "_heaps")?,
            code_cache_low_bound: stat("CodeCache", "_low_bound")?,
            code_cache_high_bound: stat("CodeCache", "_high_bound")?,
            growable_array_len: off("GrowableArrayBase", "_len")?,
            growable_array_data: off("GrowableArray<int>", "_data")?,
            code_heap_memory: off("CodeHeap", "_memory")?,
            code_heap_segmap: off("CodeHeap", "_segmap")?,
            code_heap_log2_segment_size: off("CodeHeap", "_log2_segment_size")?,
            virtual_space_low_boundary: off("VirtualSpace", "_low_boundary")?,
            virtual_space_high_boundary: off("VirtualSpace", "_high_boundary")?,
            virtual_space_low: off("VirtualSpace", "_low")?,
            virtual_space_high: off("VirtualSpace", "_high")?,
            heap_block_size: size("HeapBlock")?,
            heap_block_used: field("HeapBlock", "_header")
                .zip(field("HeapBlock::Header", "_used"))
                .map(|(h, u)| h + u),
            code_blob_name: off("CodeBlob", "_name")?,
            code_blob_code_begin: off("CodeBlob", "_code_begin")?,
            code_blob_code_end: off("CodeBlob", "_code_end")?,
            nmethod_method: off("nmethod", "_method")?,
            nmethod_scopes_data_begin: off("nmethod", "_scopes_data_begin")?,
            nmethod_scopes_pcs_offset: off("nmethod", "_scopes_pcs_offset")?,
            nmethod_dependencies_offset: off("nmethod", "_dependencies_offset")?,
            nmethod_metadata_offset: off("nmethod", "_metadata_offset")?,
            nmethod_deopt_handlers: ["_deopt_handler_begin", "_deopt_mh_handler_begin"]
                .iter()
                .filter_map(|f| field("nmethod", f))
                .collect(),
            pc_desc_size: size("PcDesc")?,
            pc_desc_pc_offset: off("PcDesc", "_pc_offset")?,
            pc_desc_scope_decode_offset: off("PcDesc", "_scope_decode_offset")?,
            invocation_entry_bci: vm.int_constant("InvocationEntryBci").unwrap_or(-1),
        })
    }
}
