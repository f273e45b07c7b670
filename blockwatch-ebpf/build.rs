use which::which;

/// Rebuild the kernel programs when bpf-linker changes (it is an undeclared
/// dependency of this crate's link step).
fn main() {
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => println!(
            "cargo:warning=bpf-linker not found on PATH: run `cargo xtask setup` to install it"
        ),
    }
}
