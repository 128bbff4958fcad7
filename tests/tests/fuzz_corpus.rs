//! The fuzz corpus as a regression suite on stable Rust: every file of `fuzz/corpus/TARGET/`
//! (the seeds, what the fuzzer kept, and the input of every crash found, `regress-*`) goes
//! through the same function the fuzz binary `TARGET` calls. A target without a corpus
//! directory fails the test: the two lists must not drift apart.

use std::path::{Path, PathBuf};

fn corpus_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus")
}

#[test]
fn every_corpus_input_passes_its_fuzz_target() {
    let root = corpus_root();
    let mut failed = Vec::new();
    let mut total = 0;
    for (name, target) in fuzz_targets::TARGETS {
        let dir = root.join(name);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}; every fuzz target has a committed corpus", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{}: no seeds; add at least one real message", dir.display());
        for f in files {
            let data = std::fs::read(&f).unwrap();
            total += 1;
            if std::panic::catch_unwind(|| target(&data)).is_err() {
                failed.push(f.display().to_string());
            }
        }
    }
    assert!(failed.is_empty(), "{} of {total} corpus inputs failed: {failed:#?}", failed.len());
    eprintln!("{total} corpus inputs replayed through {} targets", fuzz_targets::TARGETS.len());
}

#[test]
fn every_fuzz_binary_is_a_target_and_every_target_a_binary() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/fuzz_targets");
    let mut bins: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path().file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    bins.sort();
    let mut names: Vec<String> = fuzz_targets::TARGETS.iter().map(|(n, _)| n.to_string()).collect();
    names.sort();
    assert_eq!(bins, names);
}
