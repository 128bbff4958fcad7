//! `guest-get-vcpus`: the logical CPUs under `/sys/devices/system/cpu`.
//!
//! As qemu-ga: every entry whose name is `cpu` and a number, in directory order; `online`
//! from the first byte of its `online` file (anything but `0` is online) and then it can be
//! offlined; a CPU without that file (cpu0 on most machines) is online and cannot be.
//! The first error ends the walk and is the reply.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use qga_wire::QgaError;
use serde::Serialize;

use super::io_error;

/// One logical CPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Vcpu {
    pub logical_id: i64,
    pub online: bool,
    pub can_offline: bool,
}

/// The number in a directory entry's name the way `sscanf(name, "cpu%ld")` finds one.
fn cpu_number(name: &str) -> Option<i64> {
    let rest = name.strip_prefix("cpu")?.trim_start_matches(|c: char| c.is_ascii_whitespace());
    let digits_end = rest
        .char_indices()
        .find(|&(i, c)| !(c.is_ascii_digit() || (i == 0 && (c == '-' || c == '+'))))
        .map_or(rest.len(), |(i, _)| i);
    let num = &rest[..digits_end];
    if num.trim_start_matches(['-', '+']).is_empty() {
        return None;
    }
    // strtol saturates; no CPU number comes near.
    Some(num.parse().unwrap_or(if num.starts_with('-') { i64::MIN } else { i64::MAX }))
}

/// Opens a directory as `open(path, O_RDONLY | O_DIRECTORY)` does.
pub(crate) fn open_dir(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY).open(path)
}

/// `guest-get-vcpus`, with sysfs at `sysfs`.
pub fn vcpus(sysfs: &Path) -> Result<Vec<Vcpu>, QgaError> {
    let cpu_dir = sysfs.join("devices/system/cpu");
    let entries = std::fs::read_dir(&cpu_dir)
        .map_err(|e| io_error(format!("failed to list entries: {}", cpu_dir.display()), &e))?;
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let Some(id) = entry.file_name().to_str().and_then(cpu_number) else { continue };
        // qemu-ga builds the path from the number, with a trailing slash.
        let dir = format!("{}/cpu{id}/", cpu_dir.display());
        open_dir(Path::new(&dir)).map_err(|e| io_error(format!("open(\"{dir}\")"), &e))?;
        let online = format!("{dir}/online");
        let (online, can_offline) = match File::open(&online) {
            Err(e) if e.kind() == ErrorKind::NotFound => (true, false),
            Err(e) => return Err(io_error(format!("open(\"{online}\")"), &e)),
            Ok(mut f) => {
                let mut b = [0u8; 1];
                match f.read(&mut b) {
                    Err(e) => return Err(io_error(format!("pread(\"{online}\")"), &e)),
                    Ok(0) => return Err(QgaError::generic(format!("pread(\"{online}\"): unexpected EOF"))),
                    Ok(_) => (b[0] != b'0', true),
                }
            }
        };
        out.push(Vcpu { logical_id: id, online, can_offline });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::testing::write;
    use super::*;
    use serde_json::json;

    #[test]
    fn cpu_numbers_are_found_as_sscanf_finds_them() {
        let cases = [
            ("cpu0", Some(0)),
            ("cpu17", Some(17)),
            ("cpu3x", Some(3)),
            ("cpufreq", None),
            ("cpuidle", None),
            ("cpu", None),
            ("node0", None),
            ("cpu-", None),
        ];
        for (name, want) in cases {
            assert_eq!(cpu_number(name), want, "{name}");
        }
    }

    #[test]
    fn vcpus_report_online_and_offlinable_from_sysfs() {
        let d = tempfile::tempdir().unwrap();
        let sys = d.path().join("sys");
        std::fs::create_dir_all(sys.join("devices/system/cpu/cpu0")).unwrap();
        write(&sys, "devices/system/cpu/cpu1/online", "1\n");
        write(&sys, "devices/system/cpu/cpu2/online", "0\n");
        for other in ["cpufreq/policy0", "cpuidle/x", "possible", "online", "smt/active"] {
            write(&sys, &format!("devices/system/cpu/{other}"), "0-2\n");
        }
        let mut v = vcpus(&sys).unwrap();
        v.sort_by_key(|c| c.logical_id);
        assert_eq!(
            serde_json::to_value(&v).unwrap(),
            json!([
                {"logical-id": 0, "online": true, "can-offline": false},
                {"logical-id": 1, "online": true, "can-offline": true},
                {"logical-id": 2, "online": false, "can-offline": true},
            ])
        );
    }

    #[test]
    fn vcpu_errors_have_qemu_gas_words() {
        let d = tempfile::tempdir().unwrap();
        let sys = d.path().join("sys");
        let e = vcpus(&sys).unwrap_err();
        assert_eq!(
            e.desc,
            format!("failed to list entries: {}/devices/system/cpu: No such file or directory", sys.display())
        );
        write(&sys, "devices/system/cpu/cpu4/online", "");
        let e = vcpus(&sys).unwrap_err();
        assert_eq!(e.desc, format!("pread(\"{}/devices/system/cpu/cpu4//online\"): unexpected EOF", sys.display()));
        std::fs::remove_dir_all(sys.join("devices/system/cpu/cpu4")).unwrap();
        write(&sys, "devices/system/cpu/cpu5", "a file, not a directory");
        let e = vcpus(&sys).unwrap_err();
        assert_eq!(e.desc, format!("open(\"{}/devices/system/cpu/cpu5/\"): Not a directory", sys.display()));
    }

    #[test]
    fn this_machine_has_cpus_and_cpu_numbers_are_unique() {
        let v = vcpus(Path::new("/sys")).unwrap();
        assert!(!v.is_empty());
        let mut ids: Vec<_> = v.iter().map(|c| c.logical_id).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), v.len());
    }
}
