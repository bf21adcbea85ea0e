//! Builds the C shim and the OpenSIPS bindings against the source tree named
//! by `OPENSIPS_SRC` (default `/usr/local/src/opensips`).
//!
//! The shim must be compiled with exactly the definitions the core was
//! compiled with, or OpenSIPS refuses the module (its compile-flags string
//! differs) or, worse, uses another `shm_malloc`.  So the definitions are not
//! guessed here: OpenSIPS's own `Makefile.conf` and `Makefile.defs` are asked
//! for them, the way the tree's own modules get them.
//!
//! Without any tree (no `OPENSIPS_SRC` and nothing at the default path) only
//! the pure-Rust core is built, so `cargo test` runs anywhere; `make` refuses
//! to build the module in that state.  An `OPENSIPS_SRC` that is set but is
//! not a built tree stops the build with one line.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, exit};

const DEFAULT_SRC: &str = "/usr/local/src/opensips";

fn main() {
    println!("cargo:rerun-if-env-changed=OPENSIPS_SRC");
    println!("cargo::rustc-check-cfg=cfg(opensips)");

    let explicit = env::var_os("OPENSIPS_SRC").filter(|s| !s.is_empty());
    let src = PathBuf::from(explicit.clone().unwrap_or_else(|| DEFAULT_SRC.into()));
    if let Err(why) = check_tree(&src) {
        if explicit.is_some() {
            fail(&format!(
                "OPENSIPS_SRC={} {why}: set OPENSIPS_SRC to a configured and built OpenSIPS source tree",
                src.display()
            ));
        }
        println!(
            "cargo:warning=no OpenSIPS tree at {DEFAULT_SRC}: building the pure-Rust core only; set OPENSIPS_SRC to build the module"
        );
        return;
    }
    let src = src.canonicalize().unwrap_or(src);
    println!("cargo:rustc-cfg=opensips");
    for f in [
        "include/event_virtual.h",
        "opensips-headers/wrapper.h",
        "opensips-headers/tree.mk",
        "src/shim.c",
    ] {
        println!("cargo:rerun-if-changed={f}");
    }
    for f in ["Makefile.conf", "Makefile.defs", "version.h", "opensips"] {
        if src.join(f).exists() {
            println!("cargo:rerun-if-changed={}", src.join(f).display());
        }
    }

    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let flags = tree_flags(&src, &manifest);
    let defines: Vec<&String> = flags.iter().filter(|f| f.starts_with("-D")).collect();
    let include = manifest.join("include");

    let mut shim = cc::Build::new();
    shim.no_default_flags(true)
        .file("src/shim.c")
        .include(&src)
        .include(&include)
        .define("MOD_NAME", "event_virtual")
        .warnings(false);
    for f in &flags {
        shim.flag(f);
    }
    shim.compile("event_virtual_shim");

    let mut clang_args: Vec<String> = vec![
        format!("-I{}", src.display()),
        format!("-I{}", include.display()),
        "-DMOD_NAME=event_virtual".into(),
    ];
    clang_args.extend(defines.iter().map(|d| d.to_string()));
    let bindings = bindgen::Builder::default()
        .header(
            manifest
                .join("opensips-headers/wrapper.h")
                .display()
                .to_string(),
        )
        .clang_args(clang_args)
        .allowlist_type("module_exports")
        .allowlist_type("evi_export_t")
        .allowlist_type("evi_reply_sock")
        .allowlist_type("evi_async_ctx_t")
        .allowlist_function("get_trans_mod")
        .allowlist_function("evi_(dup|free)_shm_params")
        .allowlist_function("(get|release)_dummy_sip_msg")
        .allowlist_function("init_mi_result_object")
        .allowlist_function("init_mi_error_extra")
        .allowlist_function("add_mi_(array|object|string|number)")
        .allowlist_function("get_mi_(string|int)_param")
        .allowlist_function("free_mi_response")
        .allowlist_type("evi_status")
        .allowlist_function("evv_.*")
        // defined in Rust; src/ffi.rs checks them against the core's types
        .blocklist_function("evv_rs_.*")
        .allowlist_var("evv_.*")
        .allowlist_var("EVI_.*")
        .allowlist_type("evv_log_level")
        .rustified_enum("evv_log_level")
        .allowlist_type("evv_stat")
        .allowlist_type("evv_param_kind")
        .opaque_type("sip_msg")
        .opaque_type("evi_params")
        .opaque_type("mi_item_t|mi_response_t|mi_params_t|mi_handler")
        .derive_default(true)
        .wrap_unsafe_ops(true)
        .layout_tests(false)
        .generate_comments(false)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
        .generate()
        .unwrap_or_else(|e| fail(&format!("bindgen over {}: {e}", src.display())));
    let out = PathBuf::from(env::var("OUT_DIR").expect("set by cargo"));
    bindings
        .write_to_file(out.join("opensips.rs"))
        .unwrap_or_else(|e| fail(&format!("writing bindings: {e}")));
}

/// What makes a tree usable: its headers, its make definitions and a built
/// core (an unbuilt tree has no generated Makefile.conf-derived state).
fn check_tree(src: &Path) -> Result<(), String> {
    for f in ["sr_module.h", "evi/evi_transport.h", "Makefile.defs"] {
        if !src.join(f).is_file() {
            return Err(format!("is not an OpenSIPS source tree (no {f})"));
        }
    }
    if !src.join("opensips").is_file() {
        return Err("has not been built (no opensips binary)".into());
    }
    Ok(())
}

/// The compiler flags and definitions the tree's modules are built with,
/// as `opensips-headers/tree.mk` asks the tree's own make files for them.
fn tree_flags(src: &Path, manifest: &Path) -> Vec<String> {
    let mk = manifest.join("opensips-headers/tree.mk");
    let res = Command::new(env::var("MAKE").unwrap_or_else(|_| "make".into()))
        .arg("-s")
        .arg("--no-print-directory")
        .arg("-C")
        .arg(src)
        .arg("-f")
        .arg(&mk)
        .arg("evv-print-flags")
        // cargo's own variables (PROFILE, DEBUG, OPT_LEVEL, CC...) mean
        // other things to Makefile.defs: give make a clean environment
        .env_clear()
        .env("PATH", env::var_os("PATH").unwrap_or_default())
        .output()
        .unwrap_or_else(|e| fail(&format!("running make in {}: {e}", src.display())));
    if !res.status.success() {
        fail(&format!(
            "make could not read the definitions of {}: {}",
            src.display(),
            String::from_utf8_lossy(&res.stderr).trim()
        ));
    }
    let flags: Vec<String> = String::from_utf8_lossy(&res.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if !flags.iter().any(|f| f.starts_with("-DVERSION=")) {
        fail(&format!(
            "{} gave no -DVERSION definition: is it an OpenSIPS tree?",
            src.display()
        ));
    }
    flags
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    exit(1)
}
