//! `guest-get-osinfo` and `guest-get-host-name`.
//!
//! The kernel half comes from `uname`; the distribution half from `os-release`
//! (`$QGA_OS_RELEASE`, else `/etc/os-release`, else `/usr/lib/os-release`), read as qemu-ga
//! reads it: the file must be UTF-8 and parse as a GLib key file once `[os-release]` is put
//! in front (one bad line and no field is reported), and each value goes through qemu-ga's
//! unquoting, quirks included: a value not in double quotes is cut at its first space or
//! semicolon (single quotes are not quotes), and a double-quoted value that never closes
//! keeps a stray tail. A field is present in the reply only when the file has its key.

use std::collections::HashMap;
use std::path::Path;

use qga_wire::QgaError;
use serde::Serialize;

use super::{os_error, Host};

/// `guest-get-osinfo`'s reply.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct OsInfo {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_release: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pretty_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variant_id: Option<String>,
}

/// `guest-get-host-name`'s reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostName {
    #[serde(rename = "host-name")]
    pub host_name: String,
}

/// `guest-get-host-name`: this UTS namespace's host name.
pub fn host_name() -> Result<HostName, QgaError> {
    let u = kmod_shim::uts::uname().map_err(|e| os_error("cannot get hostname", e))?;
    Ok(HostName { host_name: u.nodename })
}

/// `guest-get-osinfo`.
pub fn osinfo(host: &Host) -> Result<OsInfo, QgaError> {
    let u = kmod_shim::uts::uname().map_err(|e| os_error("uname failed", e))?;
    let keys = match &host.os_release {
        Some(p) => read_os_release(p),
        None => read_os_release(&host.under_root("etc/os-release"))
            .or_else(|| read_os_release(&host.under_root("usr/lib/os-release"))),
    };
    let mut info = OsInfo {
        kernel_release: Some(u.release),
        kernel_version: Some(u.version),
        machine: Some(u.machine),
        ..OsInfo::default()
    };
    if let Some(keys) = keys {
        let get = |k: &str| keys.get(k).map(|v| unquote(v));
        info.id = get("ID");
        info.name = get("NAME");
        info.pretty_name = get("PRETTY_NAME");
        info.version = get("VERSION");
        info.version_id = get("VERSION_ID");
        info.variant = get("VARIANT");
        info.variant_id = get("VARIANT_ID");
    }
    Ok(info)
}

fn read_os_release(path: &Path) -> Option<HashMap<String, String>> {
    parse_key_file(&std::fs::read(path).ok()?)
}

/// The `[os-release]` group of `content` read as a GLib key file with that group header put
/// in front, with the raw values (`g_key_file_get_value`); `None` where GLib fails the load.
pub fn parse_key_file(content: &[u8]) -> Option<HashMap<String, String>> {
    let text = std::str::from_utf8(content).ok()?;
    let mut group = "os-release".to_string();
    let mut keys = HashMap::new();
    for raw in text.split('\n') {
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        let line = line.trim_start_matches(|c: char| c.is_ascii_whitespace());
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix('[') {
            let (name, after) = rest.split_once(']')?;
            if !after.trim_start_matches([' ', '\t']).is_empty() {
                return None; // not a group line, and not a key=value line either
            }
            if name.is_empty() || name.chars().any(|c| c == '[' || c.is_ascii_control()) {
                return None; // "Invalid group name"
            }
            group = name.to_string();
            continue;
        }
        let (key, value) = line.split_once('=')?;
        if key.is_empty() {
            return None;
        }
        let key = key.trim_end_matches(|c: char| c.is_ascii_whitespace());
        if !is_key_name(key) {
            return None;
        }
        let value = value.trim_start_matches(|c: char| c.is_ascii_whitespace());
        if key == "Encoding" && !value.eq_ignore_ascii_case("UTF-8") {
            return None;
        }
        // Translations (`KEY[locale]`) are never asked for.
        if group == "os-release" && !key.contains('[') {
            keys.insert(key.to_string(), value.to_string());
        }
    }
    Some(keys)
}

/// GLib's `g_key_file_is_key_name`.
fn is_key_name(key: &str) -> bool {
    let end = key.find(['=', '[', ']']).unwrap_or(key.len());
    let (name, rest) = key.split_at(end);
    if name.is_empty() || name.starts_with(' ') || name.ends_with(' ') {
        return false;
    }
    match rest.strip_prefix('[') {
        None => rest.is_empty(),
        Some(locale) => {
            locale.strip_suffix(']').is_some_and(|l| l.chars().all(|c| c.is_alphanumeric() || "-_.@".contains(c)))
        }
    }
}

/// qemu-ga's `ga_osrelease_replace_special`, byte for byte.
pub fn unquote(value: &str) -> String {
    let mut v = value.as_bytes().to_vec();
    if v.first() != Some(&b'"') {
        if let Some(i) = v.iter().position(|&b| b == b' ') {
            v.truncate(i);
        }
        if let Some(i) = v.iter().position(|&b| b == b';') {
            v.truncate(i);
        }
        return String::from_utf8_lossy(&v).into_owned();
    }
    // In place, as the C does: `w` writes behind `r`; the first unescaped '"' ends the
    // string there. Running off the end without one leaves the rest of the buffer as it
    // was, after what was written.
    let at = |v: &Vec<u8>, i: usize| v.get(i).copied().unwrap_or(0);
    let (mut w, mut r) = (0, 1);
    while at(&v, r) != 0 {
        if at(&v, r) == b'\\' {
            r += 1;
            if !matches!(at(&v, r), b'$' | b'\'' | b'"' | b'\\' | b'`') {
                r -= 1; // keep the backslash itself
            }
        } else if at(&v, r) == b'"' {
            v.truncate(w);
            return String::from_utf8_lossy(&v).into_owned();
        }
        v[w] = v[r];
        w += 1;
        r += 1;
    }
    String::from_utf8_lossy(&v).into_owned()
}

#[cfg(test)]
mod tests {
    use super::super::testing::{host, write};
    use super::*;
    use serde_json::json;

    #[test]
    fn unquoting_follows_qemu_ga_quirks_and_all() {
        let cases = [
            ("debian", "debian"),
            ("\"Debian GNU/Linux\"", "Debian GNU/Linux"),
            ("\"12 (bookworm)\"", "12 (bookworm)"),
            ("Debian GNU/Linux", "Debian"),
            ("a;b c", "a"),
            ("'Single Quoted'", "'Single"),
            ("\"esc \\\"q\\\" \\$HOME \\\\ \\` \\n\"", "esc \"q\" $HOME \\ ` \\n"),
            ("\"closed\" # trailing", "closed"),
            ("\"abc", "abcc"),
            ("\"\"", ""),
            ("", ""),
            ("\"ends with backslash\\", "ends with backslash\\\\"),
        ];
        for (raw, want) in cases {
            assert_eq!(unquote(raw), want, "{raw}");
        }
    }

    #[test]
    fn the_key_file_is_read_as_glib_reads_it() {
        let k = parse_key_file(b"# c\n\n  ID=debian\r\nNAME = \"X Y\"\nID=last\nVERSION=  12 \n").unwrap();
        assert_eq!(k["ID"], "last");
        assert_eq!(k["NAME"], "\"X Y\"");
        assert_eq!(k["VERSION"], "12 ");
        // Keys after another group header are not in [os-release]; translations are skipped.
        let k = parse_key_file(b"ID=a\nNAME[de]=b\n[Other]\nVERSION=1\n[os-release]\nVARIANT=v\n").unwrap();
        assert_eq!(
            (k.get("ID"), k.get("NAME"), k.get("VERSION"), k.get("VARIANT")),
            (Some(&"a".into()), None, None, Some(&"v".into()))
        );
        // One line GLib rejects and the whole file counts for nothing.
        for bad in [
            &b"ID=a\njust words\n"[..],
            b"=x\n",
            b" key =1\nID=a\nx]=1\n",
            b"[bad\n",
            b"Encoding=latin1\n",
            b"\xff=1\n",
        ] {
            assert_eq!(parse_key_file(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn osinfo_has_the_kernel_and_the_distribution_fields_present_in_the_file() {
        let d = tempfile::tempdir().unwrap();
        let h = host(d.path());
        // No os-release at all: the kernel fields only.
        let v = serde_json::to_value(osinfo(&h).unwrap()).unwrap();
        let u = kmod_shim::uts::uname().unwrap();
        assert_eq!(v, json!({"kernel-release": u.release, "kernel-version": u.version, "machine": u.machine}));
        // /usr/lib/os-release when /etc has none, and when /etc's does not parse.
        write(d.path(), "root/usr/lib/os-release", "ID=lib\nVARIANT_ID=server\nVARIANT=\"Server Edition\"\n");
        assert_eq!(osinfo(&h).unwrap().id.as_deref(), Some("lib"));
        write(d.path(), "root/etc/os-release", "garbage line\n");
        assert_eq!(osinfo(&h).unwrap().variant.as_deref(), Some("Server Edition"));
        write(
            d.path(),
            "root/etc/os-release",
            "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\nVERSION_ID=\"12\"\n\
             VERSION=\"12 (bookworm)\"\nVERSION_CODENAME=bookworm\nID=debian\n",
        );
        let v = serde_json::to_value(osinfo(&h).unwrap()).unwrap();
        assert_eq!(v["pretty-name"], "Debian GNU/Linux 12 (bookworm)");
        assert_eq!(v["name"], "Debian GNU/Linux");
        assert_eq!(v["version-id"], "12");
        assert_eq!(v["version"], "12 (bookworm)");
        assert_eq!(v["id"], "debian");
        assert!(v.get("variant").is_none() && v.get("variant-id").is_none(), "{v}");
        assert_eq!(v.as_object().unwrap().len(), 8, "{v}");
        // $QGA_OS_RELEASE, when set, is the only file read.
        let mut h2 = h.clone();
        h2.os_release = Some(write(d.path(), "other", "ID=override\n"));
        assert_eq!(osinfo(&h2).unwrap().id.as_deref(), Some("override"));
        assert_eq!(osinfo(&h2).unwrap().name, None);
    }

    #[test]
    fn the_host_name_is_this_namespaces() {
        let want = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        assert_eq!(serde_json::to_value(host_name().unwrap()).unwrap(), json!({"host-name": want.trim_end()}));
    }
}
