//! Embeds every table schema under `schemas/<namespace>/<table>.json` into the binary, so that the
//! emulator works from a single file with no data directory.

use std::fmt::Write;
use std::path::Path;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
    println!("cargo:rerun-if-changed={}", root.display());
    let mut entries = Vec::new();
    for ns in std::fs::read_dir(&root).expect("schemas/ exists") {
        let ns = ns.expect("readable schemas/");
        if !ns.file_type().expect("file type").is_dir() {
            continue;
        }
        println!("cargo:rerun-if-changed={}", ns.path().display());
        for table in std::fs::read_dir(ns.path()).expect("readable namespace folder") {
            let path = table.expect("readable entry").path();
            if path.extension().is_some_and(|e| e == "json") {
                let name = path.file_stem().unwrap().to_string_lossy().into_owned();
                entries.push((ns.file_name().to_string_lossy().into_owned(), name, path));
            }
        }
    }
    entries.sort();
    let mut out = String::from("/// (namespace, table, flat JSON Schema) for every bundled table, sorted.\n");
    out.push_str("pub static BUNDLED: &[(&str, &str, &str)] = &[\n");
    for (ns, table, path) in entries {
        writeln!(out, "    ({ns:?}, {table:?}, include_str!({:?})),", path.display().to_string()).unwrap();
    }
    out.push_str("];\n");
    let dest = Path::new(&std::env::var("OUT_DIR").unwrap()).join("bundled_schemas.rs");
    std::fs::write(dest, out).expect("write bundled_schemas.rs");
}
