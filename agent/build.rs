//! The release binary's code layout comes from `layout/vssd.order`, applied at link time by
//! `layout/cc-layout` (the linker `.cargo/config.toml` names): relink when either changes.

fn main() {
    for f in ["layout/vssd.order", "layout/cc-layout", "layout/key", "layout/match.awk", "../.cargo/config.toml"] {
        println!("cargo:rerun-if-changed={f}");
    }
}
