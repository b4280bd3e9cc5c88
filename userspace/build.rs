//! Compiles the XDP programs in ../ebpf with Debian's clang (`-target bpf`) into OUT_DIR, where the
//! crate embeds them. Needs clang and libbpf's headers: `apt-get install clang libbpf-dev`.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let ebpf = manifest.join("../ebpf");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    println!("cargo:rerun-if-changed={}", ebpf.display());

    // asm/types.h lives in the multiarch include directory on Debian.
    let multiarch = Command::new("gcc")
        .arg("-print-multiarch")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("{}-linux-gnu", env::var("CARGO_CFG_TARGET_ARCH").unwrap()));

    // ricochet.bpf.o holds the steering and responder programs (the crate embeds it); pass.bpf.o is
    // the XDP_PASS program the tests attach to a veth peer. -mcpu=v3 enables BPF atomics with fetch.
    for name in ["ricochet", "pass"] {
        let source = ebpf.join(format!("{name}.bpf.c"));
        let object = out.join(format!("{name}.bpf.o"));
        let status = Command::new(env::var("CLANG").unwrap_or_else(|_| "clang".into()))
            .args([
                "-O2", "-g", "-target", "bpf", "-mcpu=v3", "-Wall", "-Werror",
            ])
            .arg(format!("-I/usr/include/{multiarch}"))
            .arg(format!("-I{}", ebpf.display()))
            .arg("-c")
            .arg(&source)
            .arg("-o")
            .arg(&object)
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("clang failed to compile {} ({s})", source.display()),
            Err(e) => panic!(
                "cannot run clang ({e}): the XDP programs need it; install it with 'apt-get install clang libbpf-dev' (cargo xtask test does this as root)"
            ),
        }
    }
}
