//! V8's postmortem metadata: the `v8dbg_*` symbols of the node binary,
//! each an `int` holding an offset, an instance type or a tag.

use std::collections::HashMap;

use object::{Object as _, ObjectSection as _, ObjectSymbol as _};

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("cannot map the executable: {0}")]
    Map(std::io::Error),
    #[error("the executable is not an ELF file: {0}")]
    Parse(object::Error),
    #[error("no V8 postmortem symbol {0} (not a node binary, or built without them)")]
    Missing(&'static str),
}

/// Where V8 keeps what names a JS frame, in one node build.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    /// Frame slots, from the frame pointer.
    pub fp_function: i64,
    pub fp_context: i64,
    /// Field offsets from an object's (untagged) address.
    pub map: u64,
    pub instance_type: u64,
    pub jsfunction_shared: u64,
    pub sfi_name_or_scope_info: u64,
    pub sfi_script_or_debug_info: u64,
    pub script_name: u64,
    pub string_length: u64,
    pub seq_one_byte_chars: u64,
    pub seq_two_byte_chars: u64,
    pub cons_first: u64,
    pub cons_second: u64,
    pub thin_actual: u64,
    /// ScopeInfo slot indexes.
    pub scope_info_first_vars: u64,
    pub scope_info_ncontext_locals: u64,
    /// Instance types and string type bits.
    pub type_shared_function_info: u16,
    pub type_script: u16,
    pub type_scope_info: u16,
    pub first_nonstring_type: u16,
    pub string_representation_mask: u16,
    pub seq_string_tag: u16,
    pub cons_string_tag: u16,
    pub thin_string_tag: u16,
    pub string_encoding_mask: u16,
    pub one_byte_string_tag: u16,
}

impl Layout {
    /// The layout from symbol values (`v8dbg_` names without the prefix).
    pub fn from_symbols(get: impl Fn(&str) -> Option<i64>) -> Result<Layout, LayoutError> {
        let i = |name: &'static str| get(name).ok_or(LayoutError::Missing(name));
        let u = |name: &'static str| i(name).map(|v| v as u64);
        let t = |name: &'static str| i(name).map(|v| v as u16);
        Ok(Layout {
            fp_function: i("off_fp_function")?,
            fp_context: i("off_fp_context_or_frame_type").or_else(|_| i("off_fp_context"))?,
            map: u("class_HeapObject__map__Map")?,
            instance_type: u("class_Map__instance_type__uint16_t")?,
            jsfunction_shared: u("class_JSFunction__shared__SharedFunctionInfo")?,
            sfi_name_or_scope_info: u("class_SharedFunctionInfo__name_or_scope_info__Object")?,
            sfi_script_or_debug_info: u(
                "class_SharedFunctionInfo__script_or_debug_info__HeapObject",
            )
            .or_else(|_| u("class_SharedFunctionInfo__script_or_debug_info__Object"))
            .or_else(|_| u("class_SharedFunctionInfo__script__Object"))?,
            script_name: u("class_Script__name__Object")?,
            string_length: u("class_String__length__int32_t")?,
            seq_one_byte_chars: u("class_SeqOneByteString__chars__char")?,
            seq_two_byte_chars: u("class_SeqTwoByteString__chars__char")?,
            cons_first: u("class_ConsString__first__String")?,
            cons_second: u("class_ConsString__second__String")?,
            thin_actual: u("class_ThinString__actual__String")?,
            scope_info_first_vars: u("scopeinfo_idx_first_vars")?,
            scope_info_ncontext_locals: u("scopeinfo_idx_ncontextlocals")?,
            type_shared_function_info: t("type_SharedFunctionInfo__SHARED_FUNCTION_INFO_TYPE")?,
            type_script: t("type_Script__SCRIPT_TYPE")?,
            type_scope_info: t("type_ScopeInfo__SCOPE_INFO_TYPE")?,
            first_nonstring_type: t("FirstNonstringType")?,
            string_representation_mask: t("StringRepresentationMask")?,
            seq_string_tag: t("SeqStringTag")?,
            cons_string_tag: t("ConsStringTag")?,
            thin_string_tag: t("ThinStringTag")?,
            string_encoding_mask: t("StringEncodingMask")?,
            one_byte_string_tag: t("OneByteStringTag")?,
        })
    }

    /// The layout of the node binary `file` (its dynamic symbols, else its
    /// symbol table).
    pub fn from_binary(file: &std::fs::File) -> Result<Layout, LayoutError> {
        // SAFETY: a private read-only mapping; a binary truncated under us
        // would fault, which the loader's own mapping of it would too.
        let map = unsafe { memmap2::Mmap::map(file) }.map_err(LayoutError::Map)?;
        let elf = object::File::parse(&*map).map_err(LayoutError::Parse)?;
        let mut values = symbol_values(&elf, elf.dynamic_symbols());
        if !values.contains_key("off_fp_function") {
            values = symbol_values(&elf, elf.symbols());
        }
        Layout::from_symbols(|name| values.get(name).copied())
    }
}

/// The `int` each `v8dbg_` symbol holds, by name without the prefix.
fn symbol_values<'a>(
    elf: &object::File<'a>,
    symbols: impl Iterator<Item = object::Symbol<'a, 'a>>,
) -> HashMap<String, i64> {
    symbols
        .filter_map(|s| {
            let name = s.name().ok()?.strip_prefix("v8dbg_")?;
            let section = elf.section_by_index(s.section_index()?).ok()?;
            // Zero-valued ones land in .bss, which has no bytes in the file.
            let v = if section.kind() == object::SectionKind::UninitializedData {
                0
            } else {
                let bytes = section.data_range(s.address(), 4).ok()??;
                i32::from_le_bytes(bytes.try_into().ok()?)
            };
            Some((name.to_string(), i64::from(v)))
        })
        .collect()
}
