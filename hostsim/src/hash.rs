//! BLAKE3 of files: the checksum every backup file, checkpoint image and state file carries.
//!
//! One function, so that a backup's and a checkpoint's checksums are computed alike and a
//! faster way to hash lands in one place.

use std::io;
use std::path::Path;

/// BLAKE3 of a file, hex: memory-mapped and hashed on every core (BLAKE3 is a tree hash), so
/// the checksum costs a fraction of the copy.
pub fn hash_file(p: &Path) -> io::Result<String> {
    let mut h = blake3::Hasher::new();
    h.update_mmap_rayon(p)?;
    Ok(h.finalize().to_hex().to_string())
}

/// BLAKE3 of bytes in memory, hex.
pub fn hash_bytes(b: &[u8]) -> String {
    blake3::hash(b).to_hex().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_hashes_like_its_bytes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, b"checkpoint").unwrap();
        assert_eq!(hash_file(&p).unwrap(), hash_bytes(b"checkpoint"));
        assert!(hash_file(&d.path().join("missing")).is_err());
    }
}
