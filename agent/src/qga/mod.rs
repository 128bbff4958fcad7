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
//! the `qga-wire` crate; this module runs each command on the [`Agent`].

use std::sync::Arc;

use qga_wire::reply::{encode_error, encode_return};
use qga_wire::stream::{Event, Splitter};
use qga_wire::{AppFailure, CannotFreeze, Command, CommandName, Incoming, QgaError};
use serde_json::{json, Value};

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
        Session { agent, channel, splitter: Splitter::new(max), host }
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

    /// Runs one command; returns its value and whether the reply is 0xFF-delimited.
    async fn run(&mut self, cmd: Command) -> Result<(Value, bool), QgaError> {
        let value = match cmd {
            Command::SyncDelimited { id } => return Ok((json!(id), true)),
            Command::Sync { id } => json!(id),
            Command::Ping => json!({}),
            Command::Info => self.info(),
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
                let req = FreezeRequest {
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
                };
                serde_json::to_value(self.agent.freeze(req).await.map_err(refused)?).expect("report serialises")
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

    fn info(&self) -> Value {
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
        json!({ "version": env!("CARGO_PKG_VERSION"), "supported_commands": cmds })
    }
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
        let mi = dir.join("mountinfo");
        std::fs::write(&mi, "10 1 7:0 / /s/a rw - ext4 /dev/loop0 rw\n11 1 7:1 / /s/b rw - xfs /dev/loop1 rw\n")
            .unwrap();
        let cfg = Config {
            scope: "/s".into(),
            mountinfo: mi,
            sysfs: dir.join("nosys"),
            state_dir: dir.join("state"),
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
}
