//! `vmctl --connect URI backup restore DIR --as-vm NAME --to DISKS`: a libvirt domain's backup
//! brought back as a new domain of that libvirt, defined (not started) from the `domain.xml`
//! kept in the backup, with the restored standalone disks.
//!
//! What the new domain's XML changes from the backed-up one, and nothing else:
//! - `<name>` is NAME, `<uuid>` goes (libvirt makes a new one), every `<mac>` goes (new
//!   addresses: the original may still run on the same network);
//! - each backed-up disk's source is its restored file (`type='file'`, driver `qcow2`), and its
//!   `<backingStore>` goes (a restored disk stands alone); other disks (a CD-ROM, a disk left
//!   out of the backup) are kept as they were;
//! - a serial port, console or channel that writes to a file writes to one of the same name in
//!   DISKS, so two domains never share a log.
//!
//! Invariants: the backup is only read; the domain is defined only after every disk was
//! restored; a name libvirt already has is refused before anything is written. The URI must
//! be local (the disks are written on vmctl's machine and libvirt's QEMU opens them by path).

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{Host, LibvirtError};
use crate::backup::{self, BackupError};

/// What a restore as a domain made.
#[derive(Debug, Serialize)]
pub struct RestoredDomain {
    /// The new domain's name.
    pub name: String,
    /// Its disks, restored.
    pub disks: Vec<PathBuf>,
    /// The XML it was defined from (kept beside the disks).
    pub xml: PathBuf,
}

/// Why a restore as a domain failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// Reading the backup or writing the disks.
    #[error(transparent)]
    Backup(#[from] BackupError),
    /// libvirt.
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    /// Not a backup of a libvirt domain.
    #[error("{0} has no domain.xml: it is not a backup of a libvirt domain (restore its disks with --to DIR)")]
    NoDomainXml(PathBuf),
    /// The name is taken.
    #[error("libvirt at {uri} has a domain `{name}` already: pick another name for --as-vm")]
    Exists {
        /// The name.
        name: String,
        /// The URI.
        uri: String,
    },
    /// A remote URI.
    #[error(
        "--as-vm with {0}: the disks would be written on this machine, where that libvirt cannot open them; run vmctl on the host of that libvirt (or restore with --to DIR and define the domain there)"
    )]
    Remote(String),
    /// The kept XML could not be rewritten.
    #[error("cannot rewrite the backed-up domain XML: {0}")]
    Xml(String),
    /// Writing the new XML, or opening the directory to libvirt's QEMU.
    #[error("{what}")]
    Io {
        /// What failed.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl RestoreError {
    /// The documented exit code: 2 for a backup or URI this cannot be done with, 3 when
    /// libvirt cannot be reached, else 1.
    pub fn exit_code(&self) -> u8 {
        match self {
            RestoreError::Backup(e) => e.exit_code(),
            RestoreError::Libvirt(e) => e.exit_code(),
            RestoreError::NoDomainXml(_) | RestoreError::Remote(_) => 2,
            _ => 1,
        }
    }
}

/// Whether `uri` reaches a libvirtd on this machine (`qemu:///system`, `qemu+unix:///system`).
pub fn is_local(uri: &str) -> bool {
    match uri.split_once("://") {
        Some((scheme, rest)) => {
            let transport = scheme.split_once('+').map_or("", |(_, t)| t);
            (transport.is_empty() || transport == "unix") && rest.starts_with('/')
        }
        None => false,
    }
}

/// Restores backup `dir` into `to` and defines it in `host` as domain `name`.
pub fn restore_as_domain(host: &Host, dir: &Path, to: &Path, name: &str) -> Result<RestoredDomain, RestoreError> {
    if !is_local(&host.uri) {
        return Err(RestoreError::Remote(host.uri.clone()));
    }
    let xml_path = dir.join(super::backup::DOMAIN_XML);
    let xml = std::fs::read_to_string(&xml_path).map_err(|_| RestoreError::NoDomainXml(dir.to_path_buf()))?;
    match host.domain(name) {
        Ok(_) => return Err(RestoreError::Exists { name: name.into(), uri: host.uri.clone() }),
        Err(LibvirtError::NoDomain { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    // Check the XML before writing any disk.
    rewrite_domain_xml(&xml, name, &BTreeMap::new(), to).map_err(RestoreError::Xml)?;
    let made = backup::restore(dir, to)?;
    let disks: BTreeMap<String, PathBuf> =
        made.iter().filter_map(|p| Some((p.file_stem()?.to_str()?.to_string(), p.clone()))).collect();
    let new_xml = rewrite_domain_xml(&xml, name, &disks, to).map_err(RestoreError::Xml)?;
    let out = to.join(format!("{name}.xml"));
    crate::util::write_atomic(&out, new_xml.as_bytes())
        .map_err(|source| RestoreError::Io { what: format!("cannot write {}", out.display()), source })?;
    // libvirt's QEMU runs as its own user: it must pass through the directory (not list it);
    // libvirt hands it the disk files themselves when the domain starts.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o711))
            .map_err(|source| RestoreError::Io { what: format!("cannot open {} to QEMU", to.display()), source })?;
    }
    host.define(&new_xml)?;
    Ok(RestoredDomain { name: name.into(), disks: made, xml: out })
}

fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, tag: &str) -> Option<roxmltree::Node<'a, 'i>> {
    n.children().find(|c| c.has_tag_name(tag))
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('\'', "&apos;").replace('"', "&quot;")
}

/// The backed-up domain XML rewritten for a new domain `name` whose disks (by target device)
/// are `disks` and whose file outputs go to `outdir` (see the module's list). Edits are made
/// on the text, so everything else stays byte for byte.
pub fn rewrite_domain_xml(
    xml: &str,
    name: &str,
    disks: &BTreeMap<String, PathBuf>,
    outdir: &Path,
) -> Result<String, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| e.to_string())?;
    let root = doc.root_element();
    if !root.has_tag_name("domain") {
        return Err(format!("the root element is <{}>, not <domain>", root.tag_name().name()));
    }
    let mut edits: Vec<(Range<usize>, String)> = Vec::new();
    let name_el = child(root, "name").ok_or("no <name>")?;
    match name_el.first_child().filter(|t| t.is_text()) {
        Some(t) => edits.push((t.range(), escape(name))),
        None => return Err("an empty <name>".into()),
    }
    if let Some(u) = child(root, "uuid") {
        edits.push((u.range(), String::new()));
    }
    let devices = child(root, "devices").ok_or("no <devices>")?;
    for d in devices.children().filter(|n| n.is_element()) {
        match d.tag_name().name() {
            "disk" if d.attribute("device").unwrap_or("disk") == "disk" => {
                let Some(dev) = child(d, "target").and_then(|t| t.attribute("dev")) else { continue };
                let Some(path) = disks.get(dev) else { continue };
                let path = escape(&path.display().to_string());
                if let Some(a) = d.attributes().find(|a| a.name() == "type") {
                    edits.push((a.range_value(), "file".into()));
                }
                let source = child(d, "source").ok_or_else(|| format!("disk {dev} has no <source>"))?;
                edits.push((source.range(), format!("<source file='{path}'/>")));
                match child(d, "driver") {
                    Some(drv) => match drv.attributes().find(|a| a.name() == "type") {
                        Some(a) => edits.push((a.range_value(), "qcow2".into())),
                        None => {
                            let at = drv.range().start + "<driver".len();
                            edits.push((at..at, " type='qcow2'".into()));
                        }
                    },
                    None => {
                        let at = source.range().start;
                        edits.push((at..at, "<driver name='qemu' type='qcow2'/>".into()));
                    }
                }
                for b in d.children().filter(|c| c.has_tag_name("backingStore")) {
                    edits.push((b.range(), String::new()));
                }
            }
            "interface" => {
                if let Some(m) = child(d, "mac") {
                    edits.push((m.range(), String::new()));
                }
            }
            "serial" | "console" | "channel" | "parallel" if d.attribute("type") == Some("file") => {
                let Some(src) = child(d, "source") else { continue };
                let Some(a) = src.attributes().find(|a| a.name() == "path") else { continue };
                let file = Path::new(a.value())
                    .file_name()
                    .ok_or_else(|| format!("a file output without a name: {}", a.value()))?;
                edits.push((a.range_value(), escape(&outdir.join(file).display().to_string())));
            }
            _ => {}
        }
    }
    // A removed element takes its own line with it.
    let b = xml.as_bytes();
    for (r, _) in edits.iter_mut().filter(|(_, t)| t.is_empty()) {
        let mut start = r.start;
        while start > 0 && matches!(b[start - 1], b' ' | b'\t') {
            start -= 1;
        }
        if (start == 0 || b[start - 1] == b'\n') && b.get(r.end) == Some(&b'\n') {
            *r = start..r.end + 1;
        }
    }
    edits.sort_by_key(|(r, _)| (r.start, r.end));
    for w in edits.windows(2) {
        if w[0].0.end > w[1].0.start {
            return Err("overlapping edits (a malformed disk?)".into());
        }
    }
    let mut out = String::with_capacity(xml.len());
    let mut at = 0;
    for (r, text) in &edits {
        out.push_str(&xml[at..r.start]);
        out.push_str(text);
        at = r.end;
    }
    out.push_str(&xml[at..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIVE: &str = "<domain type='kvm' id='7'>
  <name>web1</name>
  <uuid>0f2f9e4c-8e0e-4c7a-9d0e-2b1f3c4d5e6f</uuid>
  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>/k/vmlinuz</kernel></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/var/lib/libvirt/images/web1.img' index='2'/>
      <backingStore type='file' index='3'><format type='raw'/><source file='/base.img'/></backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu'/>
      <source dev='/dev/vg/web1-data'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/iso/seed.iso'/>
      <target dev='sda' bus='sata'/>
    </disk>
    <interface type='network'><mac address='52:54:00:aa:bb:cc'/><source network='default'/></interface>
    <serial type='file'><source path='/var/log/web1/console.log'/><target port='0'/></serial>
    <channel type='unix'><source mode='bind' path='/run/x.sock'/><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
  </devices>
</domain>
";

    fn rewritten() -> String {
        let disks = BTreeMap::from([
            ("vda".to_string(), PathBuf::from("/r/vda.qcow2")),
            ("vdb".to_string(), PathBuf::from("/r/it's.qcow2")),
        ]);
        rewrite_domain_xml(LIVE, "web1-restored", &disks, Path::new("/r")).unwrap()
    }

    #[test]
    fn a_restored_domain_gets_its_name_its_disks_new_ids_and_its_own_logs() {
        let x = rewritten();
        let doc = roxmltree::Document::parse(&x).expect("still XML");
        let root = doc.root_element();
        assert_eq!(root.children().find(|c| c.has_tag_name("name")).and_then(|n| n.text()), Some("web1-restored"));
        assert!(!x.contains("<uuid>") && !x.contains("<mac "), "new uuid and MACs: {x}");
        assert!(x.contains("<name>web1-restored</name>\n  <os>"), "the uuid's line goes with it: {x}");
        let got = crate::libvirt::parse_disks(&x).unwrap();
        let got: Vec<(&str, &str, &str)> =
            got.iter().map(|d| (d.dev.as_str(), d.source.as_str(), d.format.as_str())).collect();
        assert_eq!(got, [("vda", "/r/vda.qcow2", "qcow2"), ("vdb", "/r/it's.qcow2", "qcow2")]);
        assert!(x.contains("<disk type='file' device='disk'>\n      <driver type='qcow2' name='qemu'/>\n      <source file='/r/it&apos;s.qcow2'/>"), "{x}");
        assert!(!x.contains("backingStore"), "a restored disk stands alone: {x}");
        assert!(x.contains("<source file='/iso/seed.iso'/>"), "a CD-ROM is kept: {x}");
        assert!(x.contains("<source path='/r/console.log'/>"), "the console log moves: {x}");
        assert!(x.contains("path='/run/x.sock'"), "a socket channel is kept: {x}");
        assert!(x.contains("<kernel>/k/vmlinuz</kernel>"));
    }

    #[test]
    fn a_disk_left_out_of_the_backup_keeps_its_source() {
        let disks = BTreeMap::from([("vda".to_string(), PathBuf::from("/r/vda.qcow2"))]);
        let x = rewrite_domain_xml(LIVE, "n", &disks, Path::new("/r")).unwrap();
        assert!(x.contains("<source dev='/dev/vg/web1-data'/>") && x.contains("<disk type='block'"), "{x}");
    }

    #[test]
    fn xml_that_is_not_a_domain_is_refused_with_why() {
        let e = rewrite_domain_xml("<network/>", "n", &BTreeMap::new(), Path::new("/r")).unwrap_err();
        assert!(e.contains("<network>"), "{e}");
        assert!(rewrite_domain_xml("<domain>", "n", &BTreeMap::new(), Path::new("/r")).is_err());
        let e = rewrite_domain_xml("<domain><devices/></domain>", "n", &BTreeMap::new(), Path::new("/r")).unwrap_err();
        assert!(e.contains("<name>"), "{e}");
    }

    #[test]
    fn only_local_uris_can_define_restored_disks() {
        for u in ["qemu:///system", "qemu:///session", "qemu+unix:///system"] {
            assert!(is_local(u), "{u}");
        }
        for u in ["qemu+ssh://host/system", "qemu+tcp://127.0.0.1:16509/system", "qemu://host/system", "bogus"] {
            assert!(!is_local(u), "{u}");
        }
    }
}
