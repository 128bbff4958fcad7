//! The host protocol: qemu-guest-agent's JSON commands, answered as qemu-ga answers them.
//!
//! A request is `{"execute": NAME, "arguments": {...}, "id": ANY}`; a reply is
//! `{"return": ...}` or `{"error": {"class": ..., "desc": ...}}`, with `id` echoed when the
//! request had one, each followed by a newline. `guest-sync-delimited`'s reply is preceded by
//! a 0xFF byte so a client can find it after a reset. While frozen, only the commands qemu-ga
//! allows while frozen run; the rest are "disabled", as in qemu-ga. Commands of our own carry
//! the `vssd-` prefix. `docs/qga-wire.md` records qemu-ga's answers that these follow.
//!
//! The wire itself (splitting, the envelope, typed commands, error wording, reply bytes) is
//! the `qga-wire` crate; this module runs each command on the [`Agent`]. With `qga-backend`,
//! a command vssd does not implement goes to a qemu-ga behind it ([`backend`]), and
//! `guest-info` lists both agents' commands.

pub mod backend;

use std::sync::Arc;

use qga_wire::command::QEMU_GA_FREEZE_ALLOWLIST;
use qga_wire::reply::{encode_error, encode_return};
use qga_wire::stream::{Event, Splitter};
use qga_wire::{AppFailure, CannotFreeze, Command, CommandName, Incoming, QgaError, Unknown};
use serde_json::{json, Value};

use self::backend::{Backend, BackendCommand, Outcome};

use crate::config::AppFailurePolicy;
use crate::guest::{self, power::SuspendMode, Host};
use crate::plan::CannotFreezePolicy;
use crate::service::{Agent, AgentError, FreezeRequest};

/// A reply ready to write: bytes including the trailing newline (and leading 0xFF if any).
pub type Reply = qga_wire::reply::ReplyBytes;

/// A failure of the agent, as the host sees it.
fn refused(e: AgentError) -> QgaError {
    // The whole chain: AgentError's own message does not repeat its source.
    QgaError::generic(format!("{:#}", anyhow::Error::from(e)))
}

/// One connection's protocol state.
pub struct Session {
    agent: Arc<Agent>,
    channel: u64,
    splitter: Splitter,
    /// Where the platform commands (guest-get-osinfo, ...) look.
    host: Arc<Host>,
    /// The qemu-ga behind vssd, when configured (shared by every session).
    backend: Option<Arc<Backend>>,
}

/// Runs a platform command on a blocking thread: it reads files and may wait for a
/// program, and must never hold up the runtime that serves the other channels (and their
/// thaws).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, QgaError> + Send + 'static) -> Result<T, QgaError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| QgaError::generic(format!("internal error: {e}")))?
}

/// A reply value from one of the guest module's typed replies.
fn value<T: serde::Serialize>(v: T) -> Value {
    serde_json::to_value(v).expect("a platform reply serialises")
}

impl Session {
    pub fn new(agent: Arc<Agent>, channel: u64) -> Self {
        let max = agent.config().max_message_bytes;
        let host = Arc::new(Host::system(&agent.config().sysfs));
        let backend = Backend::shared(agent.config());
        Session { agent, channel, splitter: Splitter::new(max), host, backend }
    }

    /// Feeds received bytes; returns the replies to send, in order.
    pub async fn feed(&mut self, data: &[u8]) -> Vec<Reply> {
        let max = self.agent.config().max_message_bytes;
        let mut out = Vec::new();
        for ev in self.splitter.feed(data) {
            out.push(match ev {
                Event::Message(m) => match self.handle(&m).await {
                    Some(r) => r,
                    // A success of guest-shutdown or guest-suspend-*: no reply, as qemu-ga.
                    None => continue,
                },
                other => match other.error(max) {
                    Some(e) => encode_error(&e, None),
                    None => continue,
                },
            });
        }
        out
    }

    /// The reply to one message; `None` for a success that gets none.
    async fn handle(&mut self, msg: &[u8]) -> Option<Reply> {
        let Incoming { id, request } = Incoming::parse(msg);
        // A name vssd does not implement: the backend's, when there is one.
        let request = match request.map(|r| r.into_unknown()) {
            Ok(Ok(unknown)) => match self.backend.clone() {
                Some(b) => return self.forward(&b, unknown, id).await,
                None => Err(QgaError::not_found(&unknown.name)),
            },
            Ok(Err(known)) => Ok(known),
            Err(e) => Err(e),
        };
        let result = match request.and_then(|r| r.command(self.agent.is_frozen())) {
            Ok(cmd) => {
                let replies = cmd.name().success_response();
                self.run(cmd).await.map(|r| replies.then_some(r))
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(Some((value, delimited))) => Some(encode_return(value, id, delimited)),
            Ok(None) => None,
            Err(e) => Some(encode_error(&e, id)),
        }
    }

    /// Runs a command vssd does not implement in the backend qemu-ga, under vssd's freeze
    /// rule: while frozen, only what qemu-ga itself allows then (which vssd implements anyway),
    /// and the rest is disabled as qemu-ga disables it (or not found, when the backend's list
    /// does not have it either).
    async fn forward(&self, backend: &Backend, req: Unknown, id: Option<Value>) -> Option<Reply> {
        if self.agent.is_frozen() && !req.allowed_while_frozen() {
            let e = match backend.lists(&req.name) {
                Some(false) => QgaError::not_found(&req.name),
                _ => QgaError::disabled_while_frozen(&req.name),
            };
            return Some(encode_error(&e, id));
        }
        match backend.forward(&req).await {
            Ok(Outcome::Reply(r)) => Some(backend::relay(r, id)),
            Ok(Outcome::NoReply) => None,
            Err(e) => {
                crate::warn_limited!(command = %req.name, error = %e, "forwarding to the qemu-ga backend failed");
                Some(encode_error(&QgaError::generic(e.to_string()), id))
            }
        }
    }

    /// Runs one command; returns its value and whether the reply is 0xFF-delimited.
    async fn run(&mut self, cmd: Command) -> Result<(Value, bool), QgaError> {
        let value = match cmd {
            Command::SyncDelimited { id } => return Ok((json!(id), true)),
            Command::Sync { id } => json!(id),
            Command::Ping => json!({}),
            Command::Info => self.info().await,
            Command::GetTime => json!(guest::time::get_time()),
            Command::SetTime { time } => {
                let host = self.host.clone();
                blocking(move || guest::time::set_time(&host, time)).await?;
                json!({})
            }
            Command::GetTimezone => value(blocking(guest::time::timezone).await?),
            Command::GetOsinfo => {
                let host = self.host.clone();
                value(blocking(move || guest::os::osinfo(&host)).await?)
            }
            Command::GetHostName => value(guest::os::host_name()?),
            Command::GetUsers => {
                let host = self.host.clone();
                value(blocking(move || guest::users::users(&host)).await?)
            }
            Command::GetVcpus => {
                let host = self.host.clone();
                value(blocking(move || guest::cpu::vcpus(&host.sysfs)).await?)
            }
            Command::GetMemoryBlocks => {
                let host = self.host.clone();
                value(blocking(move || guest::memory::blocks(&host.sysfs)).await?)
            }
            Command::GetMemoryBlockInfo => {
                let host = self.host.clone();
                value(blocking(move || guest::memory::block_info(&host.sysfs)).await?)
            }
            Command::NetworkGetInterfaces => {
                let host = self.host.clone();
                value(blocking(move || guest::net::interfaces(&host)).await?)
            }
            Command::Shutdown { mode } => {
                let host = self.host.clone();
                blocking(move || guest::power::shutdown(&host, mode)).await?;
                json!({})
            }
            Command::SuspendDisk => self.suspend(SuspendMode::Disk).await?,
            Command::SuspendRam => self.suspend(SuspendMode::Ram).await?,
            Command::SuspendHybrid => self.suspend(SuspendMode::Hybrid).await?,
            Command::FsfreezeStatus => json!(self.agent.status()),
            Command::FsfreezeFreeze => {
                let req = FreezeRequest { owner: Some(self.channel), ..Default::default() };
                json!(self.agent.freeze(req).await.map_err(refused)?.frozen)
            }
            Command::FsfreezeFreezeList { mountpoints } => {
                let req = FreezeRequest { mountpoints, owner: Some(self.channel), ..Default::default() };
                json!(self.agent.freeze(req).await.map_err(refused)?.frozen)
            }
            Command::FsfreezeThaw => json!(self.agent.thaw().await.map_err(refused)?.thawed),
            Command::GetFsinfo => {
                let paths = crate::guest::fs::Paths::from_config(self.agent.config());
                tokio::task::spawn_blocking(move || crate::guest::fs::get_fsinfo(&paths))
                    .await
                    .map_err(|e| QgaError::generic(format!("internal error: {e}")))??
            }
            Command::GetDisks => {
                let paths = crate::guest::fs::Paths::from_config(self.agent.config());
                tokio::task::spawn_blocking(move || crate::guest::fs::get_disks(&paths))
                    .await
                    .map_err(|e| QgaError::generic(format!("internal error: {e}")))??
            }
            Command::Fstrim { minimum } => {
                // Under the operation lock, so that no freeze overlaps the FITRIMs; refused
                // if a freeze got in between the frozen check of the request and here.
                let paths = crate::guest::fs::Paths::from_config(self.agent.config());
                let trim = move || crate::guest::fs::fstrim(&paths, minimum);
                match self.agent.while_thawed("trim", trim).await.map_err(refused)? {
                    Some(r) => r?,
                    None => return Err(QgaError::disabled_while_frozen(CommandName::Fstrim.as_str())),
                }
            }
            Command::VssdFreeze { mountpoints, deadline, cannot_freeze, bind_to_channel, app_failure } => {
                let req = self.freeze_request(mountpoints, deadline, cannot_freeze, bind_to_channel, app_failure);
                serde_json::to_value(self.agent.freeze(req).await.map_err(refused)?).expect("report serialises")
            }
            Command::VssdFreezePrepare { mountpoints, deadline, cannot_freeze, bind_to_channel, app_failure } => {
                let keep = deadline.unwrap_or_else(|| self.agent.config().freeze_deadline());
                let req = self.freeze_request(mountpoints, None, cannot_freeze, bind_to_channel, app_failure);
                serde_json::to_value(self.agent.prepare_freeze(req, keep).await.map_err(refused)?)
                    .expect("report serialises")
            }
            Command::VssdThaw => {
                serde_json::to_value(self.agent.thaw().await.map_err(refused)?).expect("report serialises")
            }
            Command::VssdStatus => self.agent.status_json(),
            Command::VssdPlan { mountpoints } => {
                let agent = self.agent.clone();
                let plan = tokio::task::spawn_blocking(move || agent.plan(mountpoints))
                    .await
                    .map_err(|e| QgaError::generic(format!("internal error: {e}")))?
                    .map_err(refused)?;
                let mounts: Vec<_> =
                    plan.mounts.iter().map(|m| crate::service::mount_report(m, m.outcome.name(), None)).collect();
                json!({ "mounts": mounts, "outside-scope": plan.outside_scope, "levels": plan.levels.len() })
            }
        };
        Ok((value, false))
    }

    /// The request of `vssd-freeze` (and of the `vssd-freeze-prepare` announcing it).
    fn freeze_request(
        &self,
        mountpoints: Option<Vec<std::path::PathBuf>>,
        deadline: Option<std::time::Duration>,
        cannot_freeze: Option<CannotFreeze>,
        bind_to_channel: bool,
        app_failure: Option<AppFailure>,
    ) -> FreezeRequest {
        FreezeRequest {
            mountpoints,
            deadline,
            cannot_freeze: cannot_freeze.map(|p| match p {
                CannotFreeze::Skip => CannotFreezePolicy::Skip,
                CannotFreeze::Veto => CannotFreezePolicy::Veto,
            }),
            owner: bind_to_channel.then_some(self.channel),
            app_failure: app_failure.map(|p| match p {
                AppFailure::Continue => AppFailurePolicy::Continue,
                AppFailure::Fail => AppFailurePolicy::Fail,
            }),
        }
    }

    /// The same session, with the platform commands looking at `host` (a test's files).
    #[cfg(test)]
    fn with_host(mut self, host: Host) -> Self {
        self.host = Arc::new(host);
        self
    }

    async fn suspend(&self, mode: SuspendMode) -> Result<Value, QgaError> {
        let host = self.host.clone();
        blocking(move || guest::power::suspend(&host, mode)).await?;
        Ok(json!({}))
    }

    async fn info(&self) -> Value {
        let frozen = self.agent.is_frozen();
        let cmds: Vec<Value> = CommandName::ALL
            .iter()
            .map(|c| {
                json!({
                    "name": c.as_str(),
                    "enabled": c.allowed_while_frozen() || !frozen,
                    "success-response": c.success_response(),
                })
            })
            .collect();
        let cmds = match &self.backend {
            None => cmds,
            // A backend that does not answer leaves vssd's own list, which is still true.
            Some(b) => match b.commands().await {
                Ok(theirs) => with_backend_commands(cmds, &theirs, frozen),
                Err(e) => {
                    crate::warn_limited!(error = %e, "guest-info lists vssd's commands only");
                    cmds
                }
            },
        };
        json!({ "version": env!("CARGO_PKG_VERSION"), "supported_commands": cmds })
    }
}

/// guest-info's union: vssd's own commands (`own`), then the backend's that vssd does not
/// implement, each enabled as the backend says and, while frozen, only if qemu-ga would allow
/// it then (vssd's freeze is the one that counts: the backend's freeze commands are blocked,
/// so it never knows it). The backend's entries of commands vssd implements are dropped.
fn with_backend_commands(mut own: Vec<Value>, theirs: &[BackendCommand], frozen: bool) -> Vec<Value> {
    let mut seen = std::collections::HashSet::new();
    for c in theirs {
        if CommandName::from_wire(&c.name).is_some() || !seen.insert(c.name.as_str()) {
            continue;
        }
        let allowed_now = !frozen || QEMU_GA_FREEZE_ALLOWLIST.contains(&c.name.as_str());
        own.push(json!({"name": c.name, "enabled": c.enabled && allowed_now, "success-response": c.success_response}));
    }
    own
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::engine::Kernel;
    use std::path::Path;

    struct NoopKernel;
    impl Kernel for NoopKernel {
        fn freeze(&self, _: &Path) -> std::io::Result<()> {
            Ok(())
        }
        fn thaw(&self, _: &Path) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn session(dir: &Path) -> Session {
        session_with(dir, None, 10.0)
    }

    /// A session whose agent forwards to the qemu-ga on `backend` (timeout in seconds).
    fn session_with(dir: &Path, backend: Option<&Path>, timeout: f64) -> Session {
        let mi = dir.join("mountinfo");
        std::fs::write(&mi, "10 1 7:0 / /s/a rw - ext4 /dev/loop0 rw\n11 1 7:1 / /s/b rw - xfs /dev/loop1 rw\n")
            .unwrap();
        let cfg = Config {
            scope: "/s".into(),
            mountinfo: mi,
            sysfs: dir.join("nosys"),
            state_dir: dir.join("state"),
            qga_backend: backend.map(Path::to_path_buf),
            qga_backend_timeout: timeout,
            ..Config::default()
        };
        // Never the machine's own root: a test that sends guest-shutdown or a suspend must
        // reach a fake (testing::host has no /sbin/shutdown and no helpers until it writes
        // some), not this machine's, which it would power off.
        Session::new(Agent::new(cfg, Arc::new(NoopKernel)), 1).with_host(crate::guest::testing::host(dir))
    }

    async fn one(s: &mut Session, req: &[u8]) -> Value {
        let r = s.feed(req).await;
        assert_eq!(r.len(), 1, "one reply expected for {:?}", String::from_utf8_lossy(req));
        let bytes = r[0].strip_prefix(&[0xFF]).unwrap_or(&r[0]);
        assert_eq!(bytes.last(), Some(&b'\n'));
        serde_json::from_slice(bytes).unwrap()
    }

    #[tokio::test]
    async fn sync_delimited_reply_starts_with_ff_and_echoes_the_id() {
        let d = tempfile::tempdir().unwrap();
        let mut s = session(d.path());
        let r = s.feed(b"{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":42},\"id\":\"x\"}").await;
        assert_eq!(r[0][0], 0xFF);
        let v: Value = serde_json::from_slice(&r[0][1..]).unwrap();
        assert_eq!(v, json!({"return": 42, "id": "x"}));
    }

    #[tokio::test]
    async fn errors_follow_qemu_ga_wording_and_order() {
        let d = tempfile::tempdir().unwrap();
        let mut s = session(d.path());
        let cases: &[(&[u8], &str, &str)] = &[
            (b"[1]", "GenericError", "QMP input must be a JSON object"),
            (b"{\"execute\":\"nope\",\"extra\":1}", "GenericError", "QMP input member 'extra' is unexpected"),
            (b"{}", "GenericError", "QMP input lacks member 'execute'"),
            (b"{\"execute\":\"nope\"}", "CommandNotFound", "The command nope has not been found"),
            (b"{\"execute\":\"guest-sync\"}", "GenericError", "Parameter 'id' is missing"),
            (
                b"{\"execute\":\"guest-sync\",\"arguments\":{\"id\":\"x\"}}",
                "GenericError",
                "Invalid parameter type for 'id', expected: integer",
            ),
            (b"{\"execute\":\"guest-ping\",\"arguments\":{\"x\":1}}", "GenericError", "Parameter 'x' is unexpected"),
            (
                b"{\"execute\":\"guest-fsfreeze-freeze-list\",\"arguments\":{\"mountpoints\":[1]}}",
                "GenericError",
                "Invalid parameter type for 'mountpoints[0]', expected: string",
            ),
        ];
        for (req, class, desc) in cases {
            let v = one(&mut s, req).await;
            assert_eq!(v["error"]["class"], *class, "{v}");
            assert_eq!(v["error"]["desc"], *desc, "{v}");
        }
        // Still serving.
        assert_eq!(one(&mut s, b"{\"execute\":\"guest-ping\"}").await, json!({"return": {}}));
    }

    #[tokio::test]
    async fn while_frozen_only_the_allowed_commands_run() {
        let d = tempfile::tempdir().unwrap();
        let mut s = session(d.path());
        assert_eq!(one(&mut s, b"{\"execute\":\"guest-fsfreeze-freeze\"}").await, json!({"return": 2}));
        let v = one(&mut s, b"{\"execute\":\"guest-fsfreeze-freeze-list\",\"arguments\":{\"mountpoints\":1}}").await;
        assert_eq!(v["error"]["class"], "CommandNotFound");
        assert!(v["error"]["desc"].as_str().unwrap().contains("frozen state"));
        assert_eq!(one(&mut s, b"{\"execute\":\"guest-fsfreeze-status\"}").await, json!({"return": "frozen"}));
        let info = one(&mut s, b"{\"execute\":\"guest-info\"}").await;
        let cmds = info["return"]["supported_commands"].as_array().unwrap();
        let enabled = |n: &str| cmds.iter().find(|c| c["name"] == n).unwrap()["enabled"].clone();
        assert_eq!(enabled("guest-fsfreeze-freeze"), json!(false));
        assert_eq!(enabled("guest-fsfreeze-thaw"), json!(true));
        assert_eq!(one(&mut s, b"{\"execute\":\"guest-fsfreeze-thaw\"}").await, json!({"return": 2}));
        assert_eq!(one(&mut s, b"{\"execute\":\"guest-fsfreeze-thaw\"}").await, json!({"return": 0}));
    }

    #[tokio::test]
    async fn guest_info_lists_the_platform_commands_and_which_reply_on_success() {
        let d = tempfile::tempdir().unwrap();
        let mut s = session(d.path());
        let info = one(&mut s, b"{\"execute\":\"guest-info\"}").await;
        let cmds = info["return"]["supported_commands"].as_array().unwrap();
        let get = |n: &str| cmds.iter().find(|c| c["name"] == n).unwrap_or_else(|| panic!("{n} missing")).clone();
        for n in ["guest-shutdown", "guest-suspend-disk", "guest-suspend-ram", "guest-suspend-hybrid"] {
            assert_eq!(get(n), json!({"name": n, "enabled": true, "success-response": false}));
        }
        for n in ["guest-get-time", "guest-set-time", "guest-get-osinfo", "guest-network-get-interfaces", "guest-info"]
        {
            assert_eq!(get(n)["success-response"], json!(true), "{n}");
        }
    }

    #[tokio::test]
    async fn a_shutdown_that_works_gets_no_reply_and_one_that_fails_gets_an_error() {
        use crate::guest::testing::script;
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("log");
        script(d.path(), "root/sbin/shutdown", &format!("echo \"$@\" >> {}", log.display()));
        let mut s = session(d.path());
        let r = s.feed(b"{\"execute\":\"guest-shutdown\",\"arguments\":{\"mode\":\"reboot\"},\"id\":1}").await;
        assert!(r.is_empty(), "{:?}", r.iter().map(|b| String::from_utf8_lossy(b).into_owned()).collect::<Vec<_>>());
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "-h -r +0 hypervisor initiated shutdown\n");
        // The next request is answered as usual, and only it.
        let r = s.feed(b"{\"execute\":\"guest-shutdown\"}{\"execute\":\"guest-ping\"}").await;
        assert_eq!(r.len(), 1);
        script(d.path(), "root/sbin/shutdown", "exit 1");
        let v = one(&mut s, b"{\"execute\":\"guest-shutdown\",\"id\":\"s\"}").await;
        assert_eq!(
            v,
            json!({"id": "s", "error": {"class": "GenericError", "desc": "child process has failed to shutdown"}})
        );
        let v = one(&mut s, b"{\"execute\":\"guest-shutdown\",\"arguments\":{\"mode\":\"off\"}}").await;
        assert_eq!(v["error"]["desc"], "mode is invalid (valid values are: halt|powerdown|reboot");
        // Unsupported suspend: an error reply (this host has no helpers and no power/state).
        let v = one(&mut s, b"{\"execute\":\"guest-suspend-ram\"}").await;
        assert_eq!(v["error"]["desc"], "the requested suspend mode is not supported by the guest");
    }

    #[tokio::test]
    async fn while_frozen_shutdown_and_the_platform_commands_are_refused_and_nothing_runs() {
        use crate::guest::testing::script;
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("log");
        script(d.path(), "root/sbin/shutdown", &format!("echo ran >> {}", log.display()));
        let mut s = session(d.path());
        assert_eq!(one(&mut s, b"{\"execute\":\"guest-fsfreeze-freeze\"}").await, json!({"return": 2}));
        for n in ["guest-shutdown", "guest-suspend-disk", "guest-set-time", "guest-get-osinfo", "guest-get-users"] {
            let v = one(&mut s, format!("{{\"execute\":\"{n}\"}}").as_bytes()).await;
            assert_eq!(v["error"]["class"], "CommandNotFound", "{v}");
            assert_eq!(v["error"]["desc"], format!("Command {n} has been disabled: the agent is in frozen state"));
        }
        assert!(!log.exists(), "shutdown ran while frozen");
        assert_eq!(one(&mut s, b"{\"execute\":\"guest-fsfreeze-thaw\"}").await, json!({"return": 2}));
    }

    #[tokio::test]
    async fn the_read_only_platform_commands_answer_with_qemu_gas_shapes() {
        let d = tempfile::tempdir().unwrap();
        let mut s = session(d.path()).with_host(Host::system(std::path::Path::new("/sys")));
        let t = one(&mut s, b"{\"execute\":\"guest-get-time\"}").await;
        assert!(t["return"].as_i64().unwrap() > 1_600_000_000_000_000_000, "{t}");
        let tz = one(&mut s, b"{\"execute\":\"guest-get-timezone\"}").await;
        assert!(tz["return"]["offset"].is_i64() && tz["return"]["zone"].is_string(), "{tz}");
        let h = one(&mut s, b"{\"execute\":\"guest-get-host-name\"}").await;
        assert!(h["return"]["host-name"].is_string(), "{h}");
        let v = one(&mut s, b"{\"execute\":\"guest-get-vcpus\"}").await;
        assert!(v["return"][0]["logical-id"].is_i64(), "{v}");
        let n = one(&mut s, b"{\"execute\":\"guest-network-get-interfaces\"}").await;
        assert!(n["return"].as_array().unwrap().iter().any(|i| i["name"] == "lo"), "{n}");
        let o = one(&mut s, b"{\"execute\":\"guest-get-osinfo\"}").await;
        assert!(o["return"]["kernel-release"].is_string(), "{o}");
        let u = one(&mut s, b"{\"execute\":\"guest-get-users\"}").await;
        assert!(u["return"].is_array(), "{u}");
    }

    #[tokio::test]
    async fn freezing_nothing_leaves_the_guest_thawed() {
        let d = tempfile::tempdir().unwrap();
        let mut s = session(d.path());
        let v = one(&mut s, b"{\"execute\":\"guest-fsfreeze-freeze-list\",\"arguments\":{\"mountpoints\":[]}}").await;
        assert_eq!(v, json!({"return": 0}));
        assert_eq!(one(&mut s, b"{\"execute\":\"guest-fsfreeze-status\"}").await, json!({"return": "thawed"}));
    }

    #[tokio::test]
    async fn oversized_and_interrupted_messages_get_errors_and_the_session_goes_on() {
        let d = tempfile::tempdir().unwrap();
        let mut s = session(d.path());
        let mut big = b"{\"execute\":\"guest-ping\",\"arguments\":{\"x\":\"".to_vec();
        big.extend(std::iter::repeat_n(b'a', 2 << 20));
        big.extend(b"\"}}");
        let v = one(&mut s, &big).await;
        assert!(v["error"]["desc"].as_str().unwrap().contains("exceeds the limit"), "{v}");
        let v = one(&mut s, b"{\"execute\":\xff").await;
        assert!(v["error"]["desc"].as_str().unwrap().contains("0xFF"), "{v}");
        assert_eq!(one(&mut s, b"{\"execute\":\"guest-ping\"}").await, json!({"return": {}}));
    }

    // -- the qemu-ga backend ---------------------------------------------------------------

    use super::backend::fake::{info_list, Act, FakeQemuGa};
    use std::time::{Duration, Instant};

    /// A fake qemu-ga with qemu-ga's guest-info list: guest-exec answers a pid, guest-exec-status
    /// checks its argument as qemu-ga does, the rest as `other` says.
    fn fake_with(other: impl Fn(&str, &Value) -> Act + Send + Sync + 'static) -> FakeQemuGa {
        FakeQemuGa::start(move |name, v| match name {
            "guest-info" => Act::Reply(info_list()),
            "guest-exec" => Act::Reply(json!({"return": {"pid": 4242}})),
            "guest-exec-status" if v["arguments"]["pid"].is_i64() => {
                Act::Reply(json!({"return": {"exited": true, "exitcode": 0, "out-data": "aGkK"}}))
            }
            "guest-exec-status" => Act::Reply(
                json!({"error": {"class": "GenericError", "desc": "Invalid parameter type for 'pid', expected: integer"}}),
            ),
            _ => other(name, v),
        })
    }

    fn not_found(name: &str, _: &Value) -> Act {
        Act::Reply(
            json!({"error": {"class": "CommandNotFound", "desc": format!("The command {name} has not been found")}}),
        )
    }

    fn names(info: &Value) -> Vec<String> {
        info["return"]["supported_commands"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap().into())
            .collect()
    }

    fn entry<'a>(info: &'a Value, name: &str) -> &'a Value {
        let cmds = info["return"]["supported_commands"].as_array().unwrap();
        cmds.iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("{name} not listed: {info}"))
    }

    fn desc(v: &Value) -> &str {
        v["error"]["desc"].as_str().unwrap_or_else(|| panic!("not an error: {v}"))
    }

    #[tokio::test]
    async fn without_a_backend_unknown_commands_are_not_found_as_before() {
        let d = tempfile::tempdir().unwrap();
        let mut s = session(d.path());
        for name in ["guest-exec", "guest-file-open", "guest-set-user-password", "guest-ssh-add-authorized-keys"] {
            let v = one(&mut s, json!({"execute": name, "arguments": {"x": 1}, "id": 5}).to_string().as_bytes()).await;
            let want = json!({"error": {"class": "CommandNotFound", "desc": format!("The command {name} has not been found")}, "id": 5});
            assert_eq!(v, want);
        }
        let info = one(&mut s, b"{\"execute\":\"guest-info\"}").await;
        let own: Vec<&str> = CommandName::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(names(&info), own);
    }

    #[tokio::test]
    async fn unknown_commands_run_in_the_backend_with_their_arguments_and_the_hosts_id() {
        let d = tempfile::tempdir().unwrap();
        let q = fake_with(not_found);
        let mut s = session_with(d.path(), Some(&q.path), 5.0);
        let req = json!({"execute": "guest-exec", "arguments": {"path": "/bin/echo", "arg": ["hi"], "capture-output": true}, "id": {"host": [1]}});
        let v = one(&mut s, req.to_string().as_bytes()).await;
        assert_eq!(v, json!({"return": {"pid": 4242}, "id": {"host": [1]}}));
        // Without an id, none comes back; the backend's own errors keep their class and wording.
        let v = one(&mut s, b"{\"execute\":\"guest-exec-status\",\"arguments\":{\"pid\":4242}}").await;
        assert_eq!(v, json!({"return": {"exited": true, "exitcode": 0, "out-data": "aGkK"}}));
        let v = one(&mut s, b"{\"execute\":\"guest-exec-status\",\"arguments\":{\"pid\":\"x\"},\"id\":2}").await;
        assert_eq!(
            v,
            json!({"error": {"class": "GenericError", "desc": "Invalid parameter type for 'pid', expected: integer"}, "id": 2})
        );
        let v = one(&mut s, b"{\"execute\":\"no-such-anywhere\",\"id\":3}").await;
        assert_eq!(v["error"]["class"], "CommandNotFound", "{v}");
        assert_eq!(desc(&v), "The command no-such-anywhere has not been found");
        // The backend saw the host's arguments as they were, under an id of vssd's.
        let seen = q.seen.lock().unwrap().clone();
        let exec = seen.iter().find(|v| v["execute"] == "guest-exec").unwrap();
        assert_eq!(exec["arguments"], req["arguments"]);
        assert!(exec["id"].is_i64(), "{exec}");
        // vssd's own commands never reach it, nor do bad envelopes.
        one(&mut s, b"{\"execute\":\"guest-ping\"}").await;
        one(&mut s, b"{\"execute\":\"guest-exec\",\"arguments\":[1]}").await;
        one(&mut s, b"{\"execute\":\"guest-fsfreeze-freeze\"}").await;
        one(&mut s, b"{\"execute\":\"guest-fsfreeze-thaw\"}").await;
        assert_eq!(q.ran(), ["guest-exec", "guest-exec-status", "guest-exec-status", "no-such-anywhere"]);
    }

    #[tokio::test]
    async fn guest_info_lists_vssds_commands_then_the_backends_others() {
        let d = tempfile::tempdir().unwrap();
        let q = fake_with(not_found);
        let mut s = session_with(d.path(), Some(&q.path), 5.0);
        let info = one(&mut s, b"{\"execute\":\"guest-info\"}").await;
        assert_eq!(info["return"]["version"], env!("CARGO_PKG_VERSION"));
        let mut want: Vec<String> = CommandName::ALL.iter().map(|c| c.as_str().to_string()).collect();
        want.extend(
            ["guest-exec", "guest-exec-status", "guest-file-open", "x-test-silent-on-success"].map(String::from),
        );
        assert_eq!(names(&info), want);
        // As the backend says: enabled or not, success response or not.
        assert_eq!(entry(&info, "guest-exec")["enabled"], true);
        assert_eq!(entry(&info, "guest-file-open")["enabled"], false);
        assert_eq!(entry(&info, "x-test-silent-on-success")["success-response"], false);
        // The freeze commands are vssd's (the backend's are blocked).
        assert_eq!(entry(&info, "guest-fsfreeze-freeze")["enabled"], true);

        // While frozen, vssd's rule: nothing of the backend's is enabled.
        one(&mut s, b"{\"execute\":\"guest-fsfreeze-freeze\"}").await;
        let info = one(&mut s, b"{\"execute\":\"guest-info\"}").await;
        assert_eq!(names(&info), want);
        for n in ["guest-exec", "guest-exec-status", "guest-file-open", "guest-fsfreeze-freeze"] {
            assert_eq!(entry(&info, n)["enabled"], false, "{n}");
        }
        assert_eq!(entry(&info, "guest-fsfreeze-thaw")["enabled"], true);
        one(&mut s, b"{\"execute\":\"guest-fsfreeze-thaw\"}").await;
    }

    #[tokio::test]
    async fn guest_info_without_a_running_backend_is_vssds_own_list() {
        let d = tempfile::tempdir().unwrap();
        let mut s = session_with(d.path(), Some(&d.path().join("nobody.sock")), 5.0);
        let t = Instant::now();
        let info = one(&mut s, b"{\"execute\":\"guest-info\",\"id\":1}").await;
        assert!(t.elapsed() < Duration::from_secs(1));
        let own: Vec<&str> = CommandName::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(names(&info), own);
        assert_eq!(info["id"], 1);
    }

    #[tokio::test]
    async fn while_frozen_forwarded_commands_are_disabled_as_qemu_ga_disables_them() {
        let d = tempfile::tempdir().unwrap();
        let q = fake_with(not_found);
        let mut s = session_with(d.path(), Some(&q.path), 5.0);
        one(&mut s, b"{\"execute\":\"guest-info\"}").await;
        assert_eq!(one(&mut s, b"{\"execute\":\"guest-fsfreeze-freeze\"}").await, json!({"return": 2}));
        // Arguments are not looked at: disabled first, as in qemu-ga.
        let v = one(&mut s, b"{\"execute\":\"guest-exec\",\"arguments\":{\"path\":1},\"id\":7}").await;
        assert_eq!(
            v,
            json!({"error": {"class": "CommandNotFound", "desc": "Command guest-exec has been disabled: the agent is in frozen state"}, "id": 7})
        );
        // A name the backend does not have either is not found, frozen or not.
        let v = one(&mut s, b"{\"execute\":\"no-such-anywhere\"}").await;
        assert_eq!(desc(&v), "The command no-such-anywhere has not been found");
        assert!(q.ran().is_empty(), "the backend ran {:?} while frozen", q.ran());
        assert_eq!(one(&mut s, b"{\"execute\":\"guest-fsfreeze-thaw\"}").await, json!({"return": 2}));
        assert_eq!(one(&mut s, b"{\"execute\":\"guest-exec\"}").await, json!({"return": {"pid": 4242}}));
    }

    #[tokio::test]
    async fn a_missing_or_refusing_backend_socket_is_a_clear_error_at_once() {
        let d = tempfile::tempdir().unwrap();
        // No socket at all; then a socket file nobody listens on (a killed qemu-ga leaves one).
        let gone = d.path().join("gone.sock");
        drop(std::os::unix::net::UnixListener::bind(&gone).unwrap());
        for path in [d.path().join("missing.sock"), gone] {
            let mut s = session_with(d.path(), Some(&path), 5.0);
            let t = Instant::now();
            let v = one(&mut s, b"{\"execute\":\"guest-exec\",\"id\":\"e\"}").await;
            assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
            assert_eq!((&v["error"]["class"], &v["id"]), (&json!("GenericError"), &json!("e")), "{v}");
            let text = desc(&v);
            assert!(text.contains(&path.display().to_string()), "{text}");
            assert!(text.contains("systemctl start vssd-qga-backend.service"), "{text}");
            assert!(text.starts_with("`guest-exec` was not run"), "{text}");
        }
    }

    #[tokio::test]
    async fn a_backend_that_closes_mid_reply_is_an_error_and_the_next_request_reconnects() {
        let d = tempfile::tempdir().unwrap();
        let q = fake_with(|name, _| match name {
            "guest-file-open" => Act::CloseAfter(b"{\"return\": 100".to_vec()),
            n => not_found(n, &Value::Null),
        });
        let mut s = session_with(d.path(), Some(&q.path), 5.0);
        let v = one(&mut s, b"{\"execute\":\"guest-file-open\",\"arguments\":{\"path\":\"/x\"}}").await;
        let text = desc(&v);
        assert!(text.contains("closed the connection before answering `guest-file-open`"), "{text}");
        assert!(text.contains(&q.path.display().to_string()), "{text}");
        assert_eq!(one(&mut s, b"{\"execute\":\"guest-exec\"}").await, json!({"return": {"pid": 4242}}));
    }

    #[tokio::test]
    async fn a_hung_backend_is_an_error_within_the_timeout_and_blocks_no_other_channel() {
        let d = tempfile::tempdir().unwrap();
        let q = fake_with(|name, _| match name {
            "guest-file-read" => Act::Late(Duration::from_secs(3600), json!({"return": {}})),
            n => not_found(n, &Value::Null),
        });
        let mut hung = session_with(d.path(), Some(&q.path), 0.5);
        let mut other = Session::new(hung.agent.clone(), 2);
        let t = Instant::now();
        let task = tokio::spawn(async move {
            let r = hung.feed(b"{\"execute\":\"guest-file-read\",\"arguments\":{\"handle\":1}}").await;
            (serde_json::from_slice::<Value>(&r[0]).unwrap(), t.elapsed())
        });
        tokio::task::yield_now().await;
        // Meanwhile another channel freezes, reads the status and thaws without waiting.
        let t2 = Instant::now();
        assert_eq!(one(&mut other, b"{\"execute\":\"guest-fsfreeze-freeze\"}").await, json!({"return": 2}));
        assert_eq!(one(&mut other, b"{\"execute\":\"vssd-status\"}").await["return"]["status"], "frozen");
        assert_eq!(one(&mut other, b"{\"execute\":\"guest-fsfreeze-thaw\"}").await, json!({"return": 2}));
        assert!(t2.elapsed() < Duration::from_millis(400), "{:?}", t2.elapsed());
        let (v, took) = task.await.unwrap();
        let text = desc(&v);
        assert!(text.contains("did not answer `guest-file-read` within 0.5 s (qga-backend-timeout)"), "{text}");
        assert!(text.contains("systemctl restart vssd-qga-backend.service"), "{text}");
        // Its first request also asked for the backend's list: all within the one limit.
        assert!(took >= Duration::from_millis(500) && took < Duration::from_millis(900), "{took:?}");
        // A request queued behind the hung one is bounded by its own timeout too.
        let t = Instant::now();
        let v = one(&mut other, b"{\"execute\":\"guest-exec\"}").await;
        assert!(desc(&v).contains("did not answer"), "{v}");
        assert!(t.elapsed() < Duration::from_millis(900), "{:?}", t.elapsed());
        // guest-info still answers, with vssd's own list, within the timeout.
        let info = one(&mut other, b"{\"execute\":\"guest-info\"}").await;
        assert_eq!(names(&info).len(), CommandName::ALL.len());
    }

    #[tokio::test]
    async fn a_late_reply_of_a_timed_out_request_is_dropped_and_the_next_gets_its_own() {
        let d = tempfile::tempdir().unwrap();
        let q = fake_with(|name, _| match name {
            "guest-file-read" => Act::Late(
                Duration::from_millis(700),
                json!({"return": {"count": 1, "buf-b64": "TEFURQ==", "eof": false}}),
            ),
            n => not_found(n, &Value::Null),
        });
        let mut s = session_with(d.path(), Some(&q.path), 0.4);
        let v = one(&mut s, b"{\"execute\":\"guest-file-read\",\"arguments\":{\"handle\":1},\"id\":1}").await;
        assert!(desc(&v).contains("did not answer"), "{v}");
        assert_eq!(v["id"], 1);
        // The late reply comes while this one is waiting; it is not taken for this one's.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let v = one(&mut s, b"{\"execute\":\"guest-exec\",\"id\":2}").await;
        assert_eq!(v, json!({"return": {"pid": 4242}, "id": 2}));
    }

    #[tokio::test]
    async fn a_backend_reply_over_max_message_bytes_is_an_error_not_a_crash() {
        let d = tempfile::tempdir().unwrap();
        let q = fake_with(|name, _| match name {
            "guest-file-read" => {
                Act::Reply(json!({"return": {"count": 3 << 20, "buf-b64": "A".repeat(4 << 20), "eof": true}}))
            }
            n => not_found(n, &Value::Null),
        });
        let mut s = session_with(d.path(), Some(&q.path), 5.0);
        let v = one(&mut s, b"{\"execute\":\"guest-file-read\",\"arguments\":{\"handle\":1}}").await;
        let text = desc(&v);
        assert!(text.contains("over vssd's limit of 1048576 bytes (max-message-bytes)"), "{text}");
        assert_eq!(one(&mut s, b"{\"execute\":\"guest-exec\"}").await, json!({"return": {"pid": 4242}}));
    }

    #[tokio::test]
    async fn a_forwarded_command_without_a_success_response_answers_nothing_unless_it_fails() {
        let d = tempfile::tempdir().unwrap();
        let q = fake_with(|name, v| match name {
            "x-test-silent-on-success" if v.get("arguments").is_none() => Act::Nothing,
            "x-test-silent-on-success" => {
                Act::Reply(json!({"error": {"class": "GenericError", "desc": "Parameter 'mode' is unexpected"}}))
            }
            n => not_found(n, &Value::Null),
        });
        let mut s = session_with(d.path(), Some(&q.path), 5.0);
        let t = Instant::now();
        let r = s.feed(b"{\"execute\":\"x-test-silent-on-success\"}").await;
        assert!(r.is_empty(), "{r:?}");
        assert!(t.elapsed() < Duration::from_secs(1), "it waited for a reply: {:?}", t.elapsed());
        let v = one(&mut s, b"{\"execute\":\"x-test-silent-on-success\",\"arguments\":{\"mode\":1},\"id\":4}").await;
        assert_eq!(desc(&v), "Parameter 'mode' is unexpected");
        assert_eq!(v["id"], 4);
        assert_eq!(one(&mut s, b"{\"execute\":\"guest-exec\"}").await, json!({"return": {"pid": 4242}}));
    }

    #[tokio::test]
    async fn guest_info_answers_within_two_seconds_however_long_the_backend_timeout() {
        let d = tempfile::tempdir().unwrap();
        let q = FakeQemuGa::start(|_, _| Act::Late(Duration::from_secs(3600), json!({"return": {}})));
        let mut s = session_with(d.path(), Some(&q.path), 60.0);
        let t = Instant::now();
        let info = one(&mut s, b"{\"execute\":\"guest-info\"}").await;
        assert!(t.elapsed() >= super::backend::INFO_WAIT && t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        assert_eq!(names(&info).len(), CommandName::ALL.len());
    }

    /// Issue 10, security: vssd never runs a host's program nor writes a host's file itself;
    /// those commands exist only through a configured backend.
    #[test]
    fn programs_files_passwords_and_keys_are_never_native() {
        for name in [
            "guest-exec",
            "guest-exec-status",
            "guest-file-open",
            "guest-file-write",
            "guest-file-read",
            "guest-file-close",
            "guest-file-seek",
            "guest-file-flush",
            "guest-set-user-password",
            "guest-ssh-add-authorized-keys",
            "guest-ssh-remove-authorized-keys",
            "guest-ssh-get-authorized-keys",
        ] {
            assert_eq!(CommandName::from_wire(name), None, "{name} must stay with the backend");
        }
    }
}
