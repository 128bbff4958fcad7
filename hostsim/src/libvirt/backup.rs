//! A backup of a libvirt domain through libvirt's backup API (`virDomainBackupBegin`, push
//! mode: libvirt's QEMU writes the copies into the target, which must be on the host that runs
//! the domain), with a libvirt checkpoint per backup for the next incremental.
//!
//! The flow: the disks from the domain XML → the parent (incremental: the last backup of the
//! domain in the target; its checkpoint redefined in libvirt from the `checkpoint.xml` kept
//! with it when libvirt lost it) → the agent (`guest-info` through libvirt: vssd or qemu-ga)
//! → freeze (`vssd-freeze` with a deadline, or `guest-fsfreeze-freeze`) → `backup-begin`
//! with the checkpoint → thaw at once → wait for the job → incrementals get their parent as
//! backing file → checksums, `checkpoint.xml`, `domain.xml`, the manifest → rename.
//!
//! Invariants:
//! - The manifest is vmctl's (`vmctl-backup`), so `backup list|verify|restore` work on these
//!   backups as on any other. A disk's name is its target device (`vda`); its `bitmap` is the
//!   libvirt checkpoint (named as the backup) that the next incremental starts from.
//! - The guest is thawed right after `backup-begin` returns, and on every failure path (the
//!   [`crate::quiesce::Frozen`] guard); vssd also thaws by itself at its deadline.
//! - A backup is written under `.partial-ID` and renamed when complete: a failure leaves
//!   nothing that `backup list` takes for a backup. A failed job's checkpoint is deleted.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;
use tracing::info;

use super::{Dom, Host, LibvirtError};
use crate::backup::{
    self, step, BackupError, BackupOutcome, Consistency, Manifest, ManifestDisk, QuiesceReport, SourceDisk,
    PARTIAL_PREFIX,
};
use crate::quiesce::{self, Quiesce, QuiesceError};
use crate::timings::Timings;
use crate::{hash, util};

/// The checkpoint's XML, as libvirt dumped it, kept in each backup directory.
pub const CHECKPOINT_XML: &str = "checkpoint.xml";
/// The domain's XML at the time of the backup.
pub const DOMAIN_XML: &str = "domain.xml";

/// What to back up and how.
#[derive(Debug, Clone)]
pub struct Request {
    /// libvirt's URI.
    pub uri: String,
    /// The domain.
    pub domain: String,
    /// Where backups go: on the host that runs the domain in push mode, on vmctl's in pull mode.
    pub target: PathBuf,
    /// Pull mode: libvirt's QEMU serves each disk's point-in-time view over NBD (TCP, on the
    /// host of the URI) and vmctl copies it into the target, which can be on another host.
    pub pull: bool,
    /// Copy only what changed since the last backup of the domain in `target`.
    pub incremental: bool,
    /// Quiesce policy.
    pub quiesce: Quiesce,
    /// vssd thaws by itself after this long.
    pub freeze_deadline: Duration,
    /// How long to wait for the freeze reply.
    pub freeze_timeout: Duration,
    /// How long to wait for the agent to answer `guest-info`.
    pub agent_timeout: Duration,
}

/// Errors of a libvirt backup: libvirt's or the backup's.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// libvirt trouble.
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    /// Backup trouble (the same as for vmctl's own VMs).
    #[error(transparent)]
    Backup(#[from] BackupError),
}

impl Error {
    /// The documented exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Libvirt(e) => e.exit_code(),
            Error::Backup(e) => e.exit_code(),
        }
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Backup(BackupError::Io { what, source })
}

/// Takes a backup of `req.domain`.
pub fn run(req: &Request) -> Result<BackupOutcome, Error> {
    let t_start = Instant::now();
    let host = Host::open(&req.uri)?;
    let dom = host.domain(&req.domain)?;
    if !dom.is_active() {
        return Err(LibvirtError::NotRunning(req.domain.clone()).into());
    }
    let domain_xml = dom.xml()?;
    let disks =
        super::parse_disks(&domain_xml).map_err(|detail| LibvirtError::Xml { name: req.domain.clone(), detail })?;
    if disks.is_empty() {
        return Err(BackupError::NoDisks.into());
    }
    let target = &req.target;
    // libvirt's QEMU (libvirt-qemu, or root without CAP_DAC_OVERRIDE) opens the copies below:
    // the target, and the folders vmctl creates for it (owner-only, 0700), must be
    // traversable. 0711: others may pass through to the job's directory, never list backups.
    {
        use std::os::unix::fs::PermissionsExt;
        let mut missing: Vec<&Path> =
            target.ancestors().take_while(|d| !d.as_os_str().is_empty() && !d.exists()).collect();
        std::fs::create_dir_all(target).map_err(io(format!("cannot create {}", target.display())))?;
        if missing.is_empty() {
            missing.push(target);
        }
        for d in missing {
            if let Ok(meta) = std::fs::metadata(d) {
                let mode = meta.permissions().mode() & 0o7777;
                if mode & 0o011 != 0o011 {
                    let _ = std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode | 0o011));
                }
            }
        }
    }
    let listing = backup::list(target)?;

    // The parent, and its checkpoint in libvirt.
    let parent = if req.incremental {
        let Some((pdir, pm)) = listing.good.iter().rev().find(|(_, m)| m.vm == req.domain) else {
            return Err(BackupError::NoParent(format!(
                "no earlier backup of `{}` in {}",
                req.domain,
                target.display()
            ))
            .into());
        };
        for d in &disks {
            if !pm.disks.iter().any(|md| md.name == d.dev && md.bitmap.is_some()) {
                return Err(
                    BackupError::NoParent(format!("disk `{}` has no checkpoint in backup {}", d.dev, pm.id)).into()
                );
            }
        }
        ensure_checkpoints(&dom, target, pm)?;
        Some((pdir.clone(), pm.clone()))
    } else {
        None
    };

    let (created, stamp) = util::timestamps(SystemTime::now());
    let id = format!("{}-{stamp}-{}", req.domain, if parent.is_some() { "inc" } else { "full" });
    let partial = target.join(format!("{PARTIAL_PREFIX}{id}"));
    std::fs::create_dir(&partial).map_err(io(format!("cannot create {}", partial.display())))?;
    // libvirt's QEMU (libvirt-qemu) creates and writes the copies: it must reach the directory.
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o755));
    let r = take(req, &dom, &host, &disks, &domain_xml, parent.as_ref(), &id, &created, &partial, t_start);
    match r {
        Ok(manifest) => {
            let dest = target.join(&id);
            std::fs::rename(&partial, &dest).map_err(io(format!(
                "cannot rename {} to {}",
                partial.display(),
                dest.display()
            )))?;
            util::fsync_dir(target).map_err(io("fsync of the target"))?;
            info!("manifest written: {}", dest.display());
            Ok(BackupOutcome { dir: dest, manifest })
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&partial);
            Err(e)
        }
    }
}

/// Makes sure libvirt knows the checkpoint of every backup of `pm`'s chain, redefining the
/// missing ones from their `checkpoint.xml` (oldest first: each names its parent).
fn ensure_checkpoints(dom: &Dom, target: &Path, pm: &Manifest) -> Result<(), Error> {
    let known = dom.virsh(&["checkpoint-list", "{}", "--name"])?;
    let known: Vec<&str> = known.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    for id in &pm.chain {
        if known.contains(&id.as_str()) {
            continue;
        }
        let xml = target.join(id).join(CHECKPOINT_XML);
        if !xml.exists() {
            return Err(BackupError::NoParent(format!(
                "libvirt has no checkpoint `{id}` and {} is missing",
                xml.display()
            ))
            .into());
        }
        info!("redefining the checkpoint {id} from {}", xml.display());
        dom.virsh(&["checkpoint-create", "{}", xml.to_str().unwrap_or(""), "--redefine"])?;
    }
    Ok(())
}

/// The backup's XML (push mode: a qcow2 file per disk; pull mode: an NBD server on
/// `nbd_host`, a scratch file per disk for the point-in-time view) and its checkpoint's XML.
fn job_xml(
    id: &str,
    disks: &[super::DomainDisk],
    dir: &Path,
    parent: Option<&str>,
    nbd_host: Option<(&str, u16)>,
) -> (String, String) {
    let mut b = match nbd_host {
        // libvirt wants the port ("must specify TCP port for now").
        Some((h, port)) => {
            format!("<domainbackup mode='pull'>\n  <server transport='tcp' name='{h}' port='{port}'/>\n")
        }
        None => String::from("<domainbackup mode='push'>\n"),
    };
    // A pull job exports whole disks; vmctl makes the incremental itself (see [`pull_copy`]).
    if let (Some(p), None) = (parent, nbd_host) {
        b.push_str(&format!("  <incremental>{p}</incremental>\n"));
    }
    b.push_str("  <disks>\n");
    let mut c = format!("<domaincheckpoint>\n  <name>{id}</name>\n  <disks>\n");
    for d in disks {
        let (elem, file) = match nbd_host {
            Some(_) => ("scratch", dir.join(format!(".{}.scratch", d.dev))),
            None => ("target", dir.join(format!("{}.qcow2", d.dev))),
        };
        b.push_str(&format!(
            "    <disk name='{}' backup='yes' type='file'>\n      <driver type='qcow2'/>\n      <{elem} file='{}'/>\n    </disk>\n",
            d.dev,
            file.display()
        ));
        c.push_str(&format!("    <disk name='{}' checkpoint='bitmap'/>\n", d.dev));
    }
    b.push_str("  </disks>\n</domainbackup>\n");
    c.push_str("  </disks>\n</domaincheckpoint>\n");
    (b, c)
}

/// The host QEMU's NBD server listens on in pull mode: the URI's host (the domain's host, as
/// vmctl reaches it), or loopback for a local URI (`qemu:///system`).
pub fn nbd_host(uri: &str) -> String {
    let rest = uri.split_once("://").map(|(_, r)| r).unwrap_or("");
    let auth = rest.split(['/', '?']).next().unwrap_or("");
    let hostport = auth.rsplit_once('@').map(|(_, h)| h).unwrap_or(auth);
    let host = if let Some(v6) = hostport.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        hostport.split(':').next().unwrap_or("")
    };
    if host.is_empty() {
        "127.0.0.1".into()
    } else {
        host.to_string()
    }
}

/// The NBD server's port: a free one on loopback for a local URI, else 10809 (NBD's port, the
/// first of libvirt's backup range).
fn nbd_port(host: &str) -> u16 {
    if host == "127.0.0.1" {
        if let Ok(port) = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()) {
            return port;
        }
    }
    10809
}

/// The NBD server and each disk's export of a running pull job, from `backup-dumpxml`.
/// (disk name, NBD export name) of each disk a pull job serves.
type Exports = Vec<(String, String)>;

fn pull_exports(xml: &str) -> Result<(String, u16, Exports), String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| e.to_string())?;
    let server = doc.descendants().find(|n| n.has_tag_name("server")).ok_or("no <server> in the job")?;
    let host = server.attribute("name").ok_or("the server has no name")?.to_string();
    let port = server.attribute("port").and_then(|p| p.parse().ok()).ok_or("the server has no port")?;
    let mut exports = Vec::new();
    for d in doc.descendants().filter(|n| n.has_tag_name("disk") && n.attribute("backup") != Some("no")) {
        let name = d.attribute("name").ok_or("a disk has no name")?;
        exports.push((name.to_string(), d.attribute("exportname").unwrap_or(name).to_string()));
    }
    Ok((host, port, exports))
}

/// Ends a pull job (`domjobabort`, the normal end of one) on every path, and waits until
/// libvirt has let the job go.
struct PullJob<'a> {
    dom: &'a Dom,
}

impl Drop for PullJob<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.dom.virsh(&["domjobabort", "{}"]) {
            tracing::warn!("ending the pull job: {e}");
        }
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            match self.dom.job() {
                Ok((kind, _)) if kind != virt::sys::VIR_DOMAIN_JOB_NONE as i32 => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                _ => break,
            }
        }
    }
}

/// Copies each disk of a running pull job from its NBD export into `partial`: a full is a
/// standalone qcow2 (`qemu-img convert`, holes and zeros skipped); an incremental is an
/// overlay on the export rebased (safe mode) onto the parent's file, which keeps exactly the
/// clusters that differ from the parent.
fn pull_copy(dom: &Dom, disks: &[super::DomainDisk], partial: &Path, parent: Option<&Manifest>) -> Result<(), Error> {
    let xml = dom.virsh(&["backup-dumpxml", "{}"])?;
    let (host, port, exports) =
        pull_exports(&xml).map_err(|detail| LibvirtError::Xml { name: dom.name.clone(), detail })?;
    let host = if host.contains(':') { format!("[{host}]") } else { host };
    for d in disks {
        let export = exports.iter().find(|(n, _)| *n == d.dev).map(|(_, e)| e.as_str()).unwrap_or(&d.dev);
        let url = format!("nbd://{host}:{port}/{export}");
        let file = partial.join(format!("{}.qcow2", d.dev));
        let f = file.to_str().unwrap_or("");
        info!("pulling {} from {url}", d.dev);
        match parent {
            None => qemu_img(&["convert", "-f", "raw", "-O", "qcow2", &url, f])?,
            Some(pm) => {
                qemu_img(&["create", "-q", "-f", "qcow2", "-F", "raw", "-b", &url, f])?;
                let b = format!("../{}/{}.qcow2", pm.id, d.dev);
                qemu_img(&["rebase", "-f", "qcow2", "-F", "qcow2", "-b", &b, f])?;
            }
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn take(
    req: &Request,
    dom: &Dom,
    host: &Host,
    disks: &[super::DomainDisk],
    domain_xml: &str,
    parent: Option<&(PathBuf, Manifest)>,
    id: &str,
    created: &str,
    partial: &Path,
    t_start: Instant,
) -> Result<Manifest, Error> {
    let mut timings = Timings::new(step::ALL);
    let nbd = req.pull.then(|| nbd_host(&req.uri));
    let port = nbd.as_deref().map(nbd_port).unwrap_or(0);
    let (bxml, cxml) =
        job_xml(id, disks, partial, parent.map(|(_, m)| m.id.as_str()), nbd.as_deref().map(|h| (h, port)));
    let bpath = partial.join(".backup.xml");
    let cpath = partial.join(".checkpoint-in.xml");
    std::fs::write(&bpath, &bxml).map_err(io("cannot write the backup XML"))?;
    std::fs::write(&cpath, &cxml).map_err(io("cannot write the checkpoint XML"))?;
    timings.since(step::PREPARE, t_start);

    // The agent.
    let mut q = QuiesceReport { policy: Some(req.quiesce), ..Default::default() };
    let agent = dom.agent();
    let info = if req.quiesce == Quiesce::Off {
        q.note = Some("not quiesced: --quiesce off".into());
        None
    } else {
        let t = Instant::now();
        let r = agent.info(req.agent_timeout);
        timings.since(step::AGENT, t);
        timings.set(step::AGENT_WAIT, timings.get(step::AGENT));
        match r {
            Ok(i) => Some(i),
            Err(e) => {
                q.note = Some(
                    quiesce::not_quiesced(req.quiesce, QuiesceError::Agent(e)).map_err(BackupError::QuiesceRequired)?,
                );
                None
            }
        }
    };

    // Freeze → backup-begin → thaw.
    let t_window = Instant::now();
    let frozen = match &info {
        Some(i) => {
            q.agent = Some(i.describe());
            match quiesce::freeze(dom.agent(), i, req.freeze_deadline, req.freeze_timeout) {
                Ok(f) => Some(f),
                Err(e) => {
                    q.note = Some(quiesce::not_quiesced(req.quiesce, e).map_err(BackupError::QuiesceRequired)?);
                    None
                }
            }
        }
        None => None,
    };
    if let Some(f) = &frozen {
        timings.set(step::FREEZE, f.freeze_ms());
        q.frozen = f.frozen();
        q.report = f.report().cloned();
    }
    let t_begin = Instant::now();
    let begun = dom.virsh(&["backup-begin", "{}", bpath.to_str().unwrap_or(""), cpath.to_str().unwrap_or("")]);
    let transaction_ms = timings.since(step::TRANSACTION, t_begin);
    info!("backup-begin in {transaction_ms:.1} ms");
    let quiesced = frozen.is_some();
    if let Some(f) = frozen {
        let t = Instant::now();
        let r = f.thaw();
        timings.since(step::THAW, t);
        timings.since(step::FREEZE_WINDOW, t_window);
        match r {
            Ok(v) => q.thaw = Some(v),
            Err(e) => {
                q.thaw = Some(json!(e.to_string()));
                q.note = Some(format!("the thaw failed: {e} (vssd thaws by itself at its deadline)"));
            }
        }
    }
    begun?;

    // The copy: libvirt's QEMU writes it (push), or vmctl reads it over NBD (pull).
    let copied = if req.pull {
        let job = PullJob { dom };
        let r = pull_copy(dom, disks, partial, parent.map(|(_, pm)| pm));
        drop(job);
        for d in disks {
            let _ = std::fs::remove_file(partial.join(format!(".{}.scratch", d.dev)));
        }
        r.map(|()| 0)
    } else {
        wait_for_job(dom)
    }
    .inspect_err(|_| {
        let _ = dom.virsh(&["checkpoint-delete", "{}", id]);
    })?;
    // As for vmctl's own VMs: the copy begins with the transaction (here, backup-begin).
    timings.since(step::COPY, t_begin);

    // Finish: backing files, checksums, the XMLs, the manifest.
    let t_finish = Instant::now();
    let _ = std::fs::remove_file(&bpath);
    let _ = std::fs::remove_file(&cpath);
    let mut mdisks = Vec::new();
    for d in disks {
        let file = format!("{}.qcow2", d.dev);
        let p = partial.join(&file);
        let backing = parent.map(|(_, pm)| format!("../{}/{file}", pm.id));
        if let Some(b) = &backing {
            qemu_img(&["rebase", "-u", "-F", "qcow2", "-b", b, "-f", "qcow2", p.to_str().unwrap_or("")])?;
        }
        let t = Instant::now();
        let size = std::fs::File::open(&p)
            .and_then(|f| {
                f.sync_all()?;
                f.metadata()
            })
            .map_err(io(format!("cannot read {}", p.display())))?
            .len();
        timings.raise(step::FSYNC, util::ms(t.elapsed()));
        let t = Instant::now();
        let h = hash::hash_file(&p).map_err(io(format!("cannot read {}", p.display())))?;
        timings.raise(step::HASH, util::ms(t.elapsed()));
        let info = image_info(Path::new(&d.source));
        mdisks.push(ManifestDisk {
            name: d.dev.clone(),
            file,
            backing,
            source: SourceDisk {
                name: d.dev.clone(),
                node: d.dev.clone(),
                device: d.dev.clone(),
                file: d.source.clone(),
                format: d.format.clone(),
                virtual_size: info.0,
                actual_size: info.1,
                bitmaps: vec![],
                backing_bitmaps: vec![],
                legacy_name: d.dev.clone(),
            },
            copied_bytes: 0,
            file_size: size,
            blake3: h,
            bitmap: Some(id.to_string()),
        });
    }
    // libvirt reports one count for the whole job, and only while it runs (a small job is
    // over before the first look): a disk's copied bytes are what its file holds.
    info!("libvirt's job processed {copied} bytes (as last seen while it ran)");
    for d in &mut mdisks {
        use std::os::unix::fs::MetadataExt;
        d.copied_bytes = std::fs::metadata(partial.join(&d.file)).map(|m| m.blocks() * 512).unwrap_or(d.file_size);
    }
    let cp = dom.virsh(&["checkpoint-dumpxml", "{}", id])?;
    util::write_atomic(&partial.join(CHECKPOINT_XML), cp.as_bytes()).map_err(io("cannot write checkpoint.xml"))?;
    util::write_atomic(&partial.join(DOMAIN_XML), domain_xml.as_bytes()).map_err(io("cannot write domain.xml"))?;
    let mut chain: Vec<String> = parent.map(|(_, pm)| pm.chain.clone()).unwrap_or_default();
    chain.push(id.to_string());
    let consistency = if !quiesced {
        Consistency::Crash
    } else if crate::backup::take::apps_held(q.report.as_ref()) {
        Consistency::Application
    } else {
        Consistency::Filesystem
    };
    let mut m = Manifest {
        format: backup::FORMAT.magic.into(),
        version: backup::FORMAT.version,
        id: id.to_string(),
        vm: req.domain.clone(),
        created: created.to_string(),
        kind: if parent.is_some() { "incremental" } else { "full" }.into(),
        parent: parent.map(|(_, pm)| pm.id.clone()),
        chain,
        consistency,
        quiesce: q,
        timings,
        disks: mdisks,
        qemu_version: host.hypervisor_version(),
        vm_config: None,
        vmctl_version: env!("CARGO_PKG_VERSION").into(),
    };
    m.timings.since(step::FINISH, t_finish);
    m.timings.since(step::TOTAL, t_start);
    util::write_atomic(&partial.join(backup::manifest::MANIFEST), &m.to_bytes())
        .map_err(io("cannot write the manifest"))?;
    Ok(m)
}

/// Waits for the domain's backup job to end; the bytes it copied.
fn wait_for_job(dom: &Dom) -> Result<u64, Error> {
    let mut last = 0;
    loop {
        let (kind, processed) = dom.job()?;
        if kind == virt::sys::VIR_DOMAIN_JOB_NONE as i32 {
            break;
        }
        last = last.max(processed);
        std::thread::sleep(Duration::from_millis(100));
    }
    let (failed, fields) = dom.completed_job()?;
    let field = |k: &str| fields.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    if failed {
        let detail = field("Error message").unwrap_or_else(|| "libvirt says the job failed".into());
        return Err(BackupError::JobFailed { disk: "(every disk)".into(), detail }.into());
    }
    // "Data processed:   2.063 MiB" is rounded; the running job's count is exact.
    Ok(last)
}

/// (virtual size, allocated bytes) of an image, 0s when it cannot be read (a remote host's).
fn image_info(p: &Path) -> (u64, u64) {
    let out = std::process::Command::new("qemu-img").args(["info", "-U", "--output=json"]).arg(p).output();
    match out {
        Ok(o) if o.status.success() => {
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
            (v["virtual-size"].as_u64().unwrap_or(0), v["actual-size"].as_u64().unwrap_or(0))
        }
        _ => (0, 0),
    }
}

fn qemu_img(args: &[&str]) -> Result<(), Error> {
    let out = std::process::Command::new("qemu-img").args(args).output().map_err(io("cannot run qemu-img"))?;
    if !out.status.success() {
        return Err(BackupError::QemuImg {
            what: args[0].into(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        }
        .into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_incremental_job_names_its_parent_checkpoint_and_makes_one_of_its_own() {
        let disks = vec![super::super::DomainDisk { dev: "vda".into(), source: "/a".into(), format: "qcow2".into() }];
        let (b, c) = job_xml("d-1-inc", &disks, Path::new("/t/.partial-d-1-inc"), Some("d-0-full"), None);
        assert!(b.contains("<incremental>d-0-full</incremental>"), "{b}");
        assert!(b.contains("<target file='/t/.partial-d-1-inc/vda.qcow2'/>"), "{b}");
        assert!(c.contains("<name>d-1-inc</name>") && c.contains("<disk name='vda' checkpoint='bitmap'/>"), "{c}");
        roxmltree::Document::parse(&b).unwrap();
        roxmltree::Document::parse(&c).unwrap();
    }

    #[test]
    fn a_pull_job_serves_nbd_on_the_uris_host_with_a_scratch_file_per_disk() {
        let disks = vec![super::super::DomainDisk { dev: "vda".into(), source: "/a".into(), format: "qcow2".into() }];
        let (b, _) = job_xml("d-1-inc", &disks, Path::new("/t/.p"), Some("d-0-full"), Some(("h1", 10809)));
        assert!(
            b.starts_with("<domainbackup mode='pull'>")
                && b.contains("<server transport='tcp' name='h1' port='10809'/>"),
            "{b}"
        );
        assert!(b.contains("<scratch file='/t/.p/.vda.scratch'/>") && !b.contains("<incremental>"), "{b}");
        roxmltree::Document::parse(&b).unwrap();
        for (uri, host) in [
            ("qemu:///system", "127.0.0.1"),
            ("qemu+tcp://127.0.0.1:16599/system", "127.0.0.1"),
            ("qemu+ssh://root@h2.example/system?keyfile=/k", "h2.example"),
            ("qemu+tcp://[::1]:16509/system", "::1"),
        ] {
            assert_eq!(nbd_host(uri), host, "{uri}");
        }
        let dump = "<domainbackup mode='pull'><server transport='tcp' name='127.0.0.1' port='10809'/>\
            <disks><disk name='vda' backup='yes' type='file' exportname='vda'/><disk name='sda' backup='no'/></disks></domainbackup>";
        assert_eq!(pull_exports(dump).unwrap(), ("127.0.0.1".into(), 10809, vec![("vda".into(), "vda".into())]));
    }
}
