//! The shared C library's SONAME: `libappvss.so.0` (ABI version 0 of include/appvss.h), so
//! that programs linked against it load it through the name the libappvss0 package installs
//! (packaging/build-debs.sh). Applies to the cdylib only; the rlib and staticlib are unchanged.
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libappvss.so.0");
    println!("cargo:rerun-if-changed=build.rs");
}
