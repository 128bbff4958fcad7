#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_targets::run("hv_vss_msg", data));
