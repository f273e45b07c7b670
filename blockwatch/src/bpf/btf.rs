//! Kernel structure offsets, read from the running kernel's BTF.
//!
//! The kernel programs are built without CO-RE relocations, so the offsets
//! of the few `task_struct` and `pt_regs` fields they read are looked up
//! here and handed to them as read-only globals before load.

use std::path::Path;

use blockwatch_common::KernelOffsets;
use btf_rs::{Btf, Type};

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error(
        "this kernel has no BTF ({VMLINUX_BTF} is missing): blockwatch needs a kernel built with CONFIG_DEBUG_INFO_BTF=y (any distribution kernel since 2021 has it)"
    )]
    Missing,
    #[error("cannot read kernel BTF at {VMLINUX_BTF}: {0}")]
    Read(String),
    #[error("kernel BTF has no {0}: this kernel layout is not supported")]
    NoField(String),
}

/// Byte offset and size of `field` in struct `name`, searching anonymous
/// nested structs and unions (the kernel uses them freely in task_struct).
pub fn field(btf: &Btf, name: &str, field: &str) -> Result<(u32, usize), BtfError> {
    let missing = || BtfError::NoField(format!("{name}.{field}"));
    let types = btf.resolve_types_by_name(name).map_err(|_| missing())?;
    let st = types
        .into_iter()
        .find_map(|t| match t {
            Type::Struct(s) if !s.members.is_empty() => Some(s),
            _ => None,
        })
        .ok_or_else(missing)?;
    find_member(btf, &st, field, 0, 0).ok_or_else(missing)
}

fn find_member(
    btf: &Btf,
    st: &btf_rs::Struct,
    field: &str,
    base_bits: u32,
    depth: u32,
) -> Option<(u32, usize)> {
    if depth > 8 {
        return None;
    }
    for m in &st.members {
        let name = btf.resolve_name(m).unwrap_or_default();
        let bits = base_bits + m.bit_offset();
        let ty = resolve_through_modifiers(btf, btf.resolve_chained_type(m).ok()?)?;
        if name == field {
            return Some((bits / 8, type_size(btf, &ty)));
        }
        if name.is_empty()
            && let Type::Struct(inner) | Type::Union(inner) = &ty
            && let Some(found) = find_member(btf, inner, field, bits, depth + 1)
        {
            return Some(found);
        }
    }
    None
}

fn resolve_through_modifiers(btf: &Btf, mut ty: Type) -> Option<Type> {
    for _ in 0..16 {
        match &ty {
            Type::Typedef(_) | Type::Volatile(_) | Type::Const(_) | Type::Restrict(_) => {
                ty = btf.resolve_chained_type(ty.as_btf_type()?).ok()?;
            }
            _ => return Some(ty),
        }
    }
    None
}

fn type_size(btf: &Btf, ty: &Type) -> usize {
    match ty {
        Type::Int(i) => i.size(),
        Type::Ptr(_) => 8,
        Type::Enum(e) => e.size(),
        Type::Struct(s) | Type::Union(s) => s.size(),
        Type::Array(a) => {
            let elem = btf
                .resolve_chained_type(a)
                .ok()
                .and_then(|t| resolve_through_modifiers(btf, t))
                .map(|t| type_size(btf, &t))
                .unwrap_or(0);
            elem * a.len()
        }
        _ => 0,
    }
}

fn struct_size(btf: &Btf, name: &str) -> Result<usize, BtfError> {
    btf.resolve_types_by_name(name)
        .ok()
        .and_then(|types| {
            types.into_iter().find_map(|t| match t {
                Type::Struct(s) if !s.members.is_empty() => Some(s.size()),
                _ => None,
            })
        })
        .ok_or_else(|| BtfError::NoField(format!("struct {name}")))
}

/// Reads the offsets the kernel programs need.
pub fn kernel_offsets(path: &Path) -> Result<KernelOffsets, BtfError> {
    if !path.exists() {
        return Err(BtfError::Missing);
    }
    let btf = Btf::from_file(path).map_err(|e| BtfError::Read(e.to_string()))?;
    let off = |s: &str, f: &str| field(&btf, s, f).map(|(o, _)| o);
    Ok(KernelOffsets {
        task_pid: off("task_struct", "pid")?,
        task_tgid: off("task_struct", "tgid")?,
        task_comm: off("task_struct", "comm")?,
        task_stack: off("task_struct", "stack")?,
        pt_regs_orig_ax: off("pt_regs", "orig_ax")?,
        pt_regs_ip: off("pt_regs", "ip")?,
        pt_regs_sp: off("pt_regs", "sp")?,
        pt_regs_di: off("pt_regs", "di")?,
        pt_regs_si: off("pt_regs", "si")?,
        pt_regs_dx: off("pt_regs", "dx")?,
        pt_regs_size: struct_size(&btf, "pt_regs")? as u32,
        task_fsbase: off("task_struct", "thread")? + off("thread_struct", "fsbase")?,
        pt_regs_bp: off("pt_regs", "bp")?,
        task_flags: off("task_struct", "flags")?,
        task_thread_pid: off("task_struct", "thread_pid")?,
        task_group_leader: off("task_struct", "group_leader")?,
        pid_level: off("pid", "level")?,
        pid_numbers: off("pid", "numbers")?,
        upid_size: struct_size(&btf, "upid")? as u32,
        upid_nr: off("upid", "nr")?,
        upid_ns: off("upid", "ns")?,
        pidns_inum: off("pid_namespace", "ns")? + off("ns_common", "inum")?,
        task_files: off("task_struct", "files")?,
        files_fdt: off("files_struct", "fdt")?,
        fdtable_fd: off("fdtable", "fd")?,
        fdtable_max_fds: off("fdtable", "max_fds")?,
        file_f_op: off("file", "f_op")?,
        task_sum_exec: off("task_struct", "se")? + off("sched_entity", "sum_exec_runtime")?,
        // x86-64's THREAD_SIZE without KASAN; only the raw-tracepoint
        // fallback uses it to find pt_regs at the top of the kernel stack.
        thread_size: 16384,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_of_the_running_kernel_are_sane() {
        let o = kernel_offsets(Path::new(VMLINUX_BTF)).expect("kernel BTF");
        // x86-64 pt_regs has a fixed ABI layout.
        assert_eq!(o.pt_regs_orig_ax, 120);
        assert_eq!(o.pt_regs_ip, 128);
        assert_eq!(o.pt_regs_sp, 152);
        assert_eq!(o.pt_regs_di, 112);
        assert_eq!(o.pt_regs_si, 104);
        assert_eq!(o.pt_regs_dx, 96);
        assert_eq!(o.pt_regs_size, 168);
        assert_eq!(o.pt_regs_bp, 32);
        assert!(o.task_pid > 0 && o.task_tgid == o.task_pid + 4);
        assert!(o.task_comm > o.task_pid);
        // A u64 inside the embedded sched_entity: past the task's first
        // fields, and aligned.
        assert!(o.task_sum_exec > 0 && o.task_sum_exec.is_multiple_of(8));
    }

    #[test]
    fn comm_is_sixteen_bytes() {
        let btf = Btf::from_file(VMLINUX_BTF).unwrap();
        assert_eq!(field(&btf, "task_struct", "comm").unwrap().1, 16);
        assert_eq!(field(&btf, "task_struct", "pid").unwrap().1, 4);
    }

    #[test]
    fn unknown_field_is_an_error_naming_it() {
        let btf = Btf::from_file(VMLINUX_BTF).unwrap();
        let err = field(&btf, "task_struct", "no_such_field").unwrap_err();
        assert!(err.to_string().contains("task_struct.no_such_field"));
    }

    #[test]
    fn missing_btf_says_what_to_do() {
        let err = kernel_offsets(Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(err.to_string().contains("CONFIG_DEBUG_INFO_BTF"));
    }
}
