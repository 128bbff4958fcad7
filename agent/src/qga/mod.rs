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
}

impl Session {
    pub fn new(agent: Arc<Agent>, channel: u64) -> Self {
        let max = agent.config().max_message_bytes;
        Session { agent, channel, splitter: Splitter::new(max) }
    }

    /// Feeds received bytes; returns the replies to send, in order.
    pub async fn feed(&mut self, data: &[u8]) -> Vec<Reply> {
        let max = self.agent.config().max_message_bytes;
        let mut out = Vec::new();
        for ev in self.splitter.feed(data) {
            out.push(match ev {
                Event::Message(m) => self.handle(&m).await,
                other => match other.error(max) {
                    Some(e) => encode_error(&e, None),
                    None => continue,
                },
            });
        }
        out
    }

    async fn handle(&mut self, msg: &[u8]) -> Reply {
        let Incoming { id, request } = Incoming::parse(msg);
        let result = match request.and_then(|r| r.command(self.agent.is_frozen())) {
            Ok(cmd) => self.run(cmd).await,
            Err(e) => Err(e),
        };
        match result {
            Ok((value, delimited)) => encode_return(value, id, delimited),
            Err(e) => encode_error(&e, id),
        }
    }

    /// Runs one command; returns its value and whether the reply is 0xFF-delimited.
    async fn run(&mut self, cmd: Command) -> Result<(Value, bool), QgaError> {
        let value = match cmd {
            Command::SyncDelimited { id } => return Ok((json!(id), true)),
            Command::Sync { id } => json!(id),
            Command::Ping => json!({}),
            Command::Info => self.info(),
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

    fn info(&self) -> Value {
        let frozen = self.agent.is_frozen();
        let cmds: Vec<Value> = CommandName::ALL
            .iter()
            .map(|c| {
                json!({"name": c.as_str(), "enabled": c.allowed_while_frozen() || !frozen, "success-response": true})
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
        Session::new(Agent::new(cfg, Arc::new(NoopKernel)), 1)
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
