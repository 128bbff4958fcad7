//! `guest-get-memory-blocks` and `guest-get-memory-block-info`, from
//! `/sys/devices/system/memory`.
//!
//! As qemu-ga: every directory entry named `memory…` (its number read as `strtoul` does, so
//! a name without one is block 0), in directory order; `online` when its `state` starts with
//! `online`; `can-offline` from the first byte of `removable` (false without the file); a
//! block without `state` is online and cannot be offlined. No memory directory at all is an
//! empty list; a directory with no blocks is an error. The block size is `block_size_bytes`,
//! hexadecimal.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::path::Path;

use qga_wire::QgaError;
use serde::Serialize;

use super::cpu::open_dir;
use super::io_error;

/// One memory block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MemoryBlock {
    pub phys_index: u64,
    pub online: bool,
    pub can_offline: bool,
}

/// `guest-get-memory-block-info`'s reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemoryBlockInfo {
    pub size: u64,
}

/// Reads up to `n` bytes of `dir/name` as qemu-ga's `ga_read_sysfs_file`; `Ok(None)` when
/// the file does not exist.
fn read_sysfs(dir: &str, name: &str, n: usize) -> Result<Option<Vec<u8>>, QgaError> {
    let mut f = match File::open(format!("{dir}{name}")) {
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(format!("open sysfs file \"{name}\""), &e)),
        Ok(f) => f,
    };
    let mut buf = vec![0u8; n];
    match f.read(&mut buf) {
        Err(e) => Err(io_error(format!("pread sysfs file \"{name}\""), &e)),
        Ok(0) => Err(QgaError::generic(format!("pread sysfs file \"{name}\": unexpected EOF"))),
        Ok(k) => {
            buf.truncate(k);
            Ok(Some(buf))
        }
    }
}

fn leading_number(s: &str, radix: u32) -> u64 {
    let s = s.trim_start_matches(|c: char| c.is_ascii_whitespace());
    let s = if radix == 16 { s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")).unwrap_or(s) } else { s };
    let end = s.find(|c: char| !c.is_digit(radix)).unwrap_or(s.len());
    u64::from_str_radix(&s[..end], radix).unwrap_or(if end == 0 { 0 } else { u64::MAX })
}

/// `guest-get-memory-blocks`, with sysfs at `sysfs`.
pub fn blocks(sysfs: &Path) -> Result<Vec<MemoryBlock>, QgaError> {
    let mem_dir = format!("{}/devices/system/memory/", sysfs.display());
    let entries = match std::fs::read_dir(&mem_dir) {
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error(format!("Can't open directory\"{mem_dir}\""), &e)),
        Ok(d) => d,
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(num) = name.to_str().and_then(|n| n.strip_prefix("memory")) else { continue };
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let phys_index = leading_number(num, 10);
        let dir = format!("{mem_dir}memory{phys_index}/");
        open_dir(Path::new(&dir)).map_err(|e| io_error(format!("open(\"{dir}\")"), &e))?;
        let block = match read_sysfs(&dir, "state", 10)? {
            None => MemoryBlock { phys_index, online: true, can_offline: false },
            Some(state) => {
                let can_offline = read_sysfs(&dir, "removable", 1)?.is_some_and(|r| r[0] != b'0');
                MemoryBlock { phys_index, online: state.starts_with(b"online"), can_offline }
            }
        };
        out.push(block);
    }
    if out.is_empty() {
        return Err(QgaError::generic("guest reported zero memory blocks!"));
    }
    Ok(out)
}

/// `guest-get-memory-block-info`, with sysfs at `sysfs`.
pub fn block_info(sysfs: &Path) -> Result<MemoryBlockInfo, QgaError> {
    let dir = format!("{}/devices/system/memory/", sysfs.display());
    open_dir(Path::new(&dir)).map_err(|e| io_error(format!("open(\"{dir}\")"), &e))?;
    let bytes = read_sysfs(&dir, "block_size_bytes", 20)?.ok_or_else(|| {
        QgaError::generic("open sysfs file \"block_size_bytes\": No such file or directory".to_string())
    })?;
    Ok(MemoryBlockInfo { size: leading_number(&String::from_utf8_lossy(&bytes), 16) })
}

#[cfg(test)]
mod tests {
    use super::super::testing::write;
    use super::*;
    use serde_json::json;

    #[test]
    fn blocks_report_state_and_removable() {
        let d = tempfile::tempdir().unwrap();
        let sys = d.path().join("sys");
        let m = "devices/system/memory";
        write(&sys, &format!("{m}/block_size_bytes"), "8000000\n");
        write(&sys, &format!("{m}/memory0/state"), "online\n");
        write(&sys, &format!("{m}/memory0/removable"), "0\n");
        write(&sys, &format!("{m}/memory7/state"), "offline\n");
        write(&sys, &format!("{m}/memory7/removable"), "1\n");
        write(&sys, &format!("{m}/memory9/state"), "online_movable\n");
        std::fs::create_dir_all(sys.join(format!("{m}/memory12"))).unwrap();
        write(&sys, &format!("{m}/memory_not_a_dir"), "x");
        write(&sys, &format!("{m}/auto_online_blocks"), "offline\n");
        let mut b = blocks(&sys).unwrap();
        b.sort_by_key(|b| b.phys_index);
        assert_eq!(
            serde_json::to_value(&b).unwrap(),
            json!([
                {"phys-index": 0, "online": true, "can-offline": false},
                {"phys-index": 7, "online": false, "can-offline": true},
                {"phys-index": 9, "online": true, "can-offline": false},
                {"phys-index": 12, "online": true, "can-offline": false},
            ])
        );
        assert_eq!(serde_json::to_value(block_info(&sys).unwrap()).unwrap(), json!({"size": 134_217_728}));
    }

    #[test]
    fn no_memory_directory_is_no_blocks_but_an_empty_one_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let sys = d.path().join("sys");
        assert_eq!(blocks(&sys).unwrap(), []);
        let e = block_info(&sys).unwrap_err();
        assert_eq!(e.desc, format!("open(\"{}/devices/system/memory/\"): No such file or directory", sys.display()));
        std::fs::create_dir_all(sys.join("devices/system/memory")).unwrap();
        assert_eq!(blocks(&sys).unwrap_err().desc, "guest reported zero memory blocks!");
        assert_eq!(
            block_info(&sys).unwrap_err().desc,
            "open sysfs file \"block_size_bytes\": No such file or directory"
        );
        write(&sys, "devices/system/memory/memory3/state", "");
        assert_eq!(blocks(&sys).unwrap_err().desc, "pread sysfs file \"state\": unexpected EOF");
    }

    #[test]
    fn numbers_are_read_as_strtoul_and_strtol_read_them() {
        assert_eq!(leading_number("123abc", 10), 123);
        assert_eq!(leading_number("", 10), 0);
        assert_eq!(leading_number("x", 10), 0);
        assert_eq!(leading_number("8000000\n", 16), 0x800_0000);
        assert_eq!(leading_number("0x10", 16), 16);
    }
}
