//! Rebuild the kernel programs when `bpf-linker` changes: the build depends on that binary
//! even though cargo cannot express it.
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => println!("cargo:warning=bpf-linker not found: run `cargo xtask setup`"),
    }
}
