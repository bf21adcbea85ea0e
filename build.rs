//! Builds the C shim and the OpenSIPS bindings against the source tree named
//! by `OPENSIPS_SRC`.
//!
//! The shim must be compiled with exactly the definitions the core was
//! compiled with, or OpenSIPS refuses the module (its compile-flags string
//! differs) or, worse, uses another `shm_malloc`.  So the definitions are not
//! guessed here: OpenSIPS's own `Makefile.conf` (or, in a release source
//! never built, the `Makefile.conf.template` a build would copy it from) and
//! `Makefile.defs` are asked for them, the way the tree's own modules get
//! them.  The source alone is enough: an operator with a packaged OpenSIPS
//! builds the module from the release source of that version.
//!
//! Without `OPENSIPS_SRC` only the pure-Rust core is built, so `cargo test`
//! runs anywhere.  An `OPENSIPS_SRC` that is not an OpenSIPS source tree
//! stops the build with one line.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, exit};

fn main() {
    println!("cargo:rerun-if-env-changed=OPENSIPS_SRC");
    println!("cargo::rustc-check-cfg=cfg(opensips)");

    let Some(src) = env::var_os("OPENSIPS_SRC").filter(|s| !s.is_empty()) else {
        return;
    };
    let src = PathBuf::from(src);
    if let Err(why) = check_tree(&src) {
        fail(&format!(
            "OPENSIPS_SRC={} {why}: set OPENSIPS_SRC to the source tree of your OpenSIPS version",
            src.display()
        ));
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
    for f in ["Makefile.conf", "Makefile.conf.template", "Makefile.defs"] {
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
        .allowlist_type("(param|stat|mi|proc)_export_t")
        .allowlist_var("PROC_FLAG_INITCHILD")
        .allowlist_var("INT_PARAM")
        .allowlist_var("STR_PARAM")
        .allowlist_var("STAT_(IS_FUNC|NO_RESET)")
        .allowlist_type("evi_export_t")
        .allowlist_type("evi_reply_sock")
        .allowlist_type("evi_async_ctx_t")
        .allowlist_type("evi_status")
        .allowlist_function("register_event_mod")
        .allowlist_function("get_trans_mod")
        .allowlist_function("evi_(dup|free)_shm_params")
        .allowlist_function("evi_(publish|raise)_event|evi_(get|free)_params|evi_param_add")
        .allowlist_function("(get|release)_dummy_sip_msg")
        .allowlist_function("init_mi_result_object")
        .allowlist_function("init_mi_error_extra")
        .allowlist_function("add_mi_(array|object|string|number)")
        .allowlist_function("get_mi_(string|int)_param")
        .allowlist_function("free_mi_response")
        // the clusterer (issue 18): its API as each tree declares it (4.0
        // added functions ahead of send_to), its bin packets, and the
        // dependency on it that a modparam makes
        .allowlist_type("clusterer_binds|load_clusterer_f|bin_packet_t|dep_export_t")
        .allowlist_type("clusterer_event|clusterer_send_ret|cl_node_match_op")
        .allowlist_function("find_export|alloc_module_dep|_bin_init|bin_free_packet")
        .allowlist_function("bin_(push|pop)_(str|int)")
        .allowlist_var("BIN_PACKET_MARKER_SIZE|PKG_LEN_FIELD_SIZE|DEP_WARN|MAX_MOD_DEPS")
        .allowlist_function("evv_.*")
        .allowlist_var("evv_.*")
        .allowlist_var("EVI_.*")
        .allowlist_type("evv_log_level")
        .rustified_enum("evv_log_level")
        .allowlist_type("evv_param_kind")
        .opaque_type("sip_msg")
        .opaque_type("evi_params")
        .opaque_type("stat_var")
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

/// What makes a tree usable: its headers and its make definitions.  It need
/// not be configured or built.
fn check_tree(src: &Path) -> Result<(), String> {
    for f in ["sr_module.h", "evi/evi_transport.h", "Makefile.defs"] {
        if !src.join(f).is_file() {
            return Err(format!("is not an OpenSIPS source tree (no {f})"));
        }
    }
    if !src.join("Makefile.conf").is_file() && !src.join("Makefile.conf.template").is_file() {
        return Err("has neither Makefile.conf nor Makefile.conf.template".into());
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
    let Some(version) = flags.iter().find_map(|f| f.strip_prefix("-DVERSION=")) else {
        fail(&format!(
            "{} gave no -DVERSION definition: is it an OpenSIPS tree?",
            src.display()
        ));
    };
    // the release alone, as `3.6.8`, for the module's start-up line
    println!(
        "cargo:rustc-env=EVV_OPENSIPS_VERSION={}",
        version.trim_matches('"')
    );
    flags
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    exit(1)
}
