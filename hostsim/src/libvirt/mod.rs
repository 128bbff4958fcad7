//! vmctl on libvirt: the domains that libvirtd runs, on this host or another, reached through
//! libvirt's own client library (the `virt` crate) with a connection URI (`qemu:///system`,
//! `qemu+ssh://host/system`, `qemu+tcp://host/system`).
//!
//! libvirt keeps each domain's QMP socket for itself, so everything goes through libvirt: the
//! guest agent through `virDomainQemuAgentCommand` (libvirt does the resync), the disks from
//! the domain's XML, the backup through libvirt's backup API ([`backup`]).
//!
//! Invariants:
//! - The agent is behind [`crate::quiesce::Agent`], so a libvirt backup freezes and thaws
//!   through the same guard as vmctl's own VMs: every path that froze the guest thaws it.
//! - The `virt` crate (0.5) has no binding for the backup and checkpoint calls, and `unsafe`
//!   stays out of this crate: those few calls go through `virsh -c URI`, libvirt's own client
//!   of the same API ([`virsh`]). Everything else is a library call.

use std::process::Command;
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};
use virt::connect::Connect;
use virt::domain::{Domain, DomainState};
use virt::enumutil::Enum;
use virt::error::ErrorNumber;

use crate::qga::{AgentInfo, QgaError};
use crate::quiesce::Agent;

pub mod backup;
pub mod checkpoint;
pub mod restore;

/// Errors of vmctl's libvirt side. Each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    /// No connection to libvirtd.
    #[error("cannot connect to libvirt at {uri} (is libvirtd running there? is the URI right?)")]
    Connect {
        /// The URI.
        uri: String,
        /// libvirt's error.
        #[source]
        source: virt::error::Error,
    },
    /// No such domain.
    #[error("libvirt at {uri} has no domain `{name}` (`vmctl --connect {uri} list`)")]
    NoDomain {
        /// The domain.
        name: String,
        /// The URI.
        uri: String,
    },
    /// The domain does not run.
    #[error("domain `{0}` is not running (`virsh start {0}`)")]
    NotRunning(String),
    /// A libvirt call failed.
    #[error("libvirt: {what} failed")]
    Call {
        /// What was asked.
        what: String,
        /// libvirt's error.
        #[source]
        source: virt::error::Error,
    },
    /// A `virsh` call failed.
    #[error("virsh {what} failed: {detail}")]
    Virsh {
        /// The subcommand.
        what: String,
        /// Its message.
        detail: String,
    },
    /// The domain's XML could not be read.
    #[error("cannot read the domain XML of `{name}`: {detail}")]
    Xml {
        /// The domain.
        name: String,
        /// Why.
        detail: String,
    },
}

impl LibvirtError {
    /// The documented exit code: 3 when libvirt or the domain cannot be reached, else 1.
    pub fn exit_code(&self) -> u8 {
        match self {
            LibvirtError::Connect { .. } | LibvirtError::NoDomain { .. } | LibvirtError::NotRunning(_) => 3,
            _ => 1,
        }
    }
}

fn call(what: impl Into<String>) -> impl FnOnce(virt::error::Error) -> LibvirtError {
    let what = what.into();
    move |source| LibvirtError::Call { what, source }
}

/// A connection to one libvirtd.
pub struct Host {
    /// The URI it was opened with.
    pub uri: String,
    conn: Connect,
}

/// One domain as `vmctl list` / `status` show it.
#[derive(Debug, Clone, Serialize)]
pub struct DomainStatus {
    /// The domain's name.
    pub name: String,
    /// `running`, `paused`, `shut off`, ...
    pub state: String,
    /// The libvirt URI.
    pub uri: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// Its disks (running domains).
    pub disks: Vec<DomainDisk>,
}

/// A disk of a domain, from its XML.
#[derive(Debug, Clone, Serialize)]
pub struct DomainDisk {
    /// The target device (`vda`): the disk's name in backups.
    pub dev: String,
    /// The image (file or block device).
    pub source: String,
    /// The format (`qcow2`, `raw`).
    pub format: String,
}

impl Host {
    /// Opens `uri` (read-write: backups and the agent need it).
    pub fn open(uri: &str) -> Result<Host, LibvirtError> {
        // libvirt prints every error to stderr by default; vmctl reports them itself.
        virt::error::clear_error_callback();
        let conn = Connect::open(Some(uri)).map_err(|source| LibvirtError::Connect { uri: uri.into(), source })?;
        Ok(Host { uri: uri.to_string(), conn })
    }

    /// Every domain (running ones first, then by name).
    pub fn list(&self) -> Result<Vec<DomainStatus>, LibvirtError> {
        let doms = self.conn.list_all_domains(0).map_err(call("listing the domains"))?;
        let mut v: Vec<DomainStatus> = doms.iter().filter_map(|d| status_of(&self.uri, d).ok()).collect();
        v.sort_by(|a, b| (a.state != "running", &a.name).cmp(&(b.state != "running", &b.name)));
        Ok(v)
    }

    /// The names of the running domains.
    pub fn running(&self) -> Result<Vec<String>, LibvirtError> {
        let doms = self
            .conn
            .list_all_domains(virt::sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)
            .map_err(call("listing the domains"))?;
        let mut v: Vec<String> = doms.iter().filter_map(|d| d.name().ok()).collect();
        v.sort();
        Ok(v)
    }

    /// The domain `name`.
    pub fn domain(&self, name: &str) -> Result<Dom, LibvirtError> {
        match self.conn.lookup_domain_by_name(name) {
            Ok(dom) => Ok(Dom { uri: self.uri.clone(), name: name.to_string(), dom }),
            Err(e) if matches!(e.code(), Enum::Known(ErrorNumber::NoDomain)) => {
                Err(LibvirtError::NoDomain { name: name.into(), uri: self.uri.clone() })
            }
            Err(e) => Err(call(format!("looking up `{name}`"))(e)),
        }
    }

    /// Defines (does not start) a domain from `xml`.
    pub fn define(&self, xml: &str) -> Result<(), LibvirtError> {
        self.conn.define_domain_xml(xml).map(|_| ()).map_err(call("defining the restored domain"))
    }

    /// The hypervisor's version (`7.2.0`).
    pub fn hypervisor_version(&self) -> String {
        match self.conn.hyp_version() {
            Ok(v) => format!("{}.{}.{}", v / 1_000_000, (v / 1000) % 1000, v % 1000),
            Err(_) => "?".into(),
        }
    }
}

fn state_name(d: &Domain) -> String {
    match d.state().map(|s| s.0) {
        Ok(Enum::Known(s)) => match s {
            DomainState::NoState => "no state",
            DomainState::Running => "running",
            DomainState::Blocked => "blocked",
            DomainState::Paused => "paused",
            DomainState::Shutdown => "shutting down",
            DomainState::Shutoff => "shut off",
            DomainState::Crashed => "crashed",
            DomainState::PMSuspended => "pmsuspended",
        }
        .to_string(),
        _ => "unknown".into(),
    }
}

fn status_of(uri: &str, d: &Domain) -> Result<DomainStatus, LibvirtError> {
    let name = d.name().map_err(call("the domain's name"))?;
    let info = d.info().map_err(call(format!("the state of `{name}`")))?;
    let xml = d.xml_desc(0).map_err(call(format!("the XML of `{name}`")))?;
    Ok(DomainStatus {
        state: state_name(d),
        uri: uri.to_string(),
        vcpus: info.nr_virt_cpu,
        memory_mib: info.memory / 1024,
        disks: parse_disks(&xml).map_err(|detail| LibvirtError::Xml { name: name.clone(), detail })?,
        name,
    })
}

/// The disks (`<disk device='disk'>` with a file or block source) of a domain XML, in order.
pub fn parse_disks(xml: &str) -> Result<Vec<DomainDisk>, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| e.to_string())?;
    let mut v = Vec::new();
    for d in
        doc.descendants().filter(|n| n.has_tag_name("disk") && n.parent().is_some_and(|p| p.has_tag_name("devices")))
    {
        if d.attribute("device").unwrap_or("disk") != "disk" {
            continue;
        }
        let child = |tag: &str| d.children().find(|c| c.has_tag_name(tag));
        let Some(dev) = child("target").and_then(|t| t.attribute("dev")) else { continue };
        let source = child("source").and_then(|s| s.attribute("file").or(s.attribute("dev"))).unwrap_or("");
        let format = child("driver").and_then(|s| s.attribute("type")).unwrap_or("raw");
        v.push(DomainDisk { dev: dev.into(), source: source.into(), format: format.into() });
    }
    Ok(v)
}

/// A domain of a [`Host`].
pub struct Dom {
    /// The URI of its libvirtd.
    pub uri: String,
    /// Its name.
    pub name: String,
    dom: Domain,
}

impl Dom {
    /// Where it stands.
    pub fn status(&self) -> Result<DomainStatus, LibvirtError> {
        status_of(&self.uri, &self.dom)
    }

    /// True when it runs (or is paused: its QEMU is there).
    pub fn is_active(&self) -> bool {
        self.dom.is_active().unwrap_or(false)
    }

    /// Its uuid.
    pub fn uuid(&self) -> Result<String, LibvirtError> {
        self.dom.uuid_string().map_err(call(format!("the uuid of `{}`", self.name)))
    }

    /// Its live XML.
    pub fn xml(&self) -> Result<String, LibvirtError> {
        self.dom.xml_desc(0).map_err(call(format!("the XML of `{}`", self.name)))
    }

    /// Its guest agent, through libvirt.
    pub fn agent(&self) -> LvAgent<'_> {
        LvAgent { dom: &self.dom }
    }

    /// The domain's job now: (type, bytes processed); type 0 (`VIR_DOMAIN_JOB_NONE`) when none
    /// runs. (virDomainGetJobInfo: the `virt` crate's job_stats mishandles an empty answer.)
    pub fn job(&self) -> Result<(i32, u64), LibvirtError> {
        let s = self.dom.job_info().map_err(call(format!("the job of `{}`", self.name)))?;
        Ok((s.r#type, s.data_processed.unwrap_or(0).max(s.disk_processed.unwrap_or(0))))
    }

    /// The last completed job, as `virsh domjobinfo --completed` tells it: (failed, its
    /// fields).
    pub fn completed_job(&self) -> Result<(bool, Vec<(String, String)>), LibvirtError> {
        let text = self.virsh(&["domjobinfo", "{}", "--completed"])?;
        let fields: Vec<(String, String)> = text
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        let failed = fields.iter().any(|(k, v)| k == "Job type" && v == "Failed");
        Ok((failed, fields))
    }

    /// `virsh -c URI ARGS...`, with the domain's name put where `{}` is.
    pub fn virsh(&self, args: &[&str]) -> Result<String, LibvirtError> {
        let args: Vec<&str> = args.iter().map(|a| if *a == "{}" { self.name.as_str() } else { a }).collect();
        virsh(&self.uri, &args)
    }
}

/// `virsh -c URI ARGS`; its stdout, or its stderr as the error.
pub fn virsh(uri: &str, args: &[&str]) -> Result<String, LibvirtError> {
    let what = args.first().copied().unwrap_or("").to_string();
    let out =
        Command::new("virsh").arg("-q").arg("-c").arg(uri).args(args).output().map_err(|e| LibvirtError::Virsh {
            what: what.clone(),
            detail: format!("cannot run virsh: {e} (apt-get install libvirt-clients)"),
        })?;
    if !out.status.success() {
        return Err(LibvirtError::Virsh { what, detail: String::from_utf8_lossy(&out.stderr).trim().to_string() });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A domain's guest agent reached through `virDomainQemuAgentCommand`. libvirt resyncs
/// before each command, so [`Agent::execute`] and [`Agent::command`] are the same call.
pub struct LvAgent<'a> {
    dom: &'a Domain,
}

impl LvAgent<'_> {
    /// Runs `command`; its `return` value.
    pub fn run(&self, command: &str, args: Option<Value>, limit: Duration) -> Result<Value, QgaError> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let secs = limit.as_secs_f64().ceil().max(1.0) as i32;
        match self.dom.qemu_agent_command(&msg.to_string(), secs, 0) {
            Ok(text) => {
                let v: Value = serde_json::from_str(&text).map_err(|e| QgaError::Command {
                    command: command.into(),
                    class: "libvirt".into(),
                    desc: format!("unreadable reply {text:?}: {e}"),
                })?;
                Ok(v.get("return").cloned().unwrap_or(Value::Null))
            }
            Err(e) => Err(agent_error(command, limit, &e)),
        }
    }

    /// `guest-info`: which agent answers.
    pub fn info(&self, limit: Duration) -> Result<AgentInfo, QgaError> {
        let v = self.run("guest-info", None, limit)?;
        let commands: Vec<String> = v["supported_commands"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|c| c["enabled"].as_bool().unwrap_or(true))
                    .filter_map(|c| c["name"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let is_vssd = commands.iter().any(|c| c == "vssd-freeze");
        Ok(AgentInfo { version: v["version"].as_str().unwrap_or("?").to_string(), is_vssd, commands })
    }
}

/// libvirt's agent errors as the agent client's: silent (no agent, or it hangs) or refused.
fn agent_error(command: &str, limit: Duration, e: &virt::error::Error) -> QgaError {
    match e.code() {
        Enum::Known(
            ErrorNumber::AgentUnresponsive | ErrorNumber::AgentCommandTimeout | ErrorNumber::OperationTimeout,
        ) => QgaError::Silent { command: command.into(), after: limit },
        _ => QgaError::Command { command: command.into(), class: "libvirt".into(), desc: e.message().to_string() },
    }
}

impl Agent for LvAgent<'_> {
    fn execute(&mut self, command: &str, args: Option<Value>, limit: Duration) -> Result<Value, QgaError> {
        self.run(command, args, limit)
    }
    fn command(&mut self, command: &str, args: Option<Value>, limit: Duration) -> Result<Value, QgaError> {
        self.run(command, args, limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_disks_of_a_domain_xml_are_its_file_and_block_disks_in_order() {
        let xml = "<domain><devices>
  <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/v/a.qcow2'/><target dev='vda' bus='virtio'/></disk>
  <disk type='file' device='cdrom'><source file='/v/x.iso'/><target dev='sda'/></disk>
  <disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/dev/sdb'/><target dev='vdb'/></disk>
</devices></domain>";
        let d = parse_disks(xml).unwrap();
        let v: Vec<_> = d.iter().map(|d| (d.dev.as_str(), d.source.as_str(), d.format.as_str())).collect();
        assert_eq!(v, [("vda", "/v/a.qcow2", "qcow2"), ("vdb", "/dev/sdb", "raw")]);
    }
}
