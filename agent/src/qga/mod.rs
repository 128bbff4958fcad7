//! The host protocol: qemu-guest-agent's JSON commands, answered as qemu-ga answers them.
//!
//! A request is `{"execute": NAME, "arguments": {...}, "id": ANY}`; a reply is
//! `{"return": ...}` or `{"error": {"class": ..., "desc": ...}}`, with `id` echoed when the
//! request had one, each followed by a newline. `guest-sync-delimited`'s reply is preceded by
//! a 0xFF byte so a client can find it after a reset. While frozen, only the commands qemu-ga
//! allows while frozen run; the rest are "disabled", as in qemu-ga. Commands of our own carry
//! the `vssd-` prefix. `docs/qga-wire.md` records qemu-ga's answers that these follow.

pub mod stream;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::config::AppFailurePolicy;
use crate::plan::CannotFreezePolicy;
use crate::service::{Agent, AgentError, FreezeRequest};
use stream::Event;

/// One command the agent knows.
struct Command {
    name: &'static str,
    allowed_while_frozen: bool,
}

const COMMANDS: &[Command] = &[
    Command { name: "guest-sync-delimited", allowed_while_frozen: true },
    Command { name: "guest-sync", allowed_while_frozen: true },
    Command { name: "guest-ping", allowed_while_frozen: true },
    Command { name: "guest-info", allowed_while_frozen: true },
    Command { name: "guest-fsfreeze-status", allowed_while_frozen: true },
    Command { name: "guest-fsfreeze-freeze", allowed_while_frozen: false },
    Command { name: "guest-fsfreeze-freeze-list", allowed_while_frozen: false },
    Command { name: "guest-fsfreeze-thaw", allowed_while_frozen: true },
    Command { name: "vssd-freeze", allowed_while_frozen: false },
    Command { name: "vssd-thaw", allowed_while_frozen: true },
    Command { name: "vssd-status", allowed_while_frozen: true },
    Command { name: "vssd-plan", allowed_while_frozen: true },
];

/// A QGA error: class and description.
#[derive(Debug, Clone, PartialEq)]
pub struct QgaError {
    pub class: &'static str,
    pub desc: String,
}

impl QgaError {
    fn generic(desc: impl Into<String>) -> Self {
        QgaError { class: "GenericError", desc: desc.into() }
    }
}

impl From<AgentError> for QgaError {
    fn from(e: AgentError) -> Self {
        QgaError::generic(e.to_string())
    }
}

/// A reply ready to write: bytes including the trailing newline (and leading 0xFF if any).
pub type Reply = Vec<u8>;

fn encode(body: Value, id: Option<Value>, delimited: bool) -> Reply {
    let mut body = body;
    if let (Some(id), Value::Object(m)) = (id, &mut body) {
        m.insert("id".into(), id);
    }
    let mut out = Vec::with_capacity(64);
    if delimited {
        out.push(0xFF);
    }
    serde_json::to_writer(&mut out, &body).expect("a Value always serialises");
    out.push(b'\n');
    out
}

fn error_reply(e: QgaError, id: Option<Value>) -> Reply {
    encode(json!({"error": {"class": e.class, "desc": e.desc}}), id, false)
}

/// One connection's protocol state.
pub struct Session {
    agent: Arc<Agent>,
    channel: u64,
    splitter: stream::Splitter,
}

impl Session {
    pub fn new(agent: Arc<Agent>, channel: u64) -> Self {
        let max = agent.config().max_message_bytes;
        Session { agent, channel, splitter: stream::Splitter::new(max) }
    }

    /// Feeds received bytes; returns the replies to send, in order.
    pub async fn feed(&mut self, data: &[u8]) -> Vec<Reply> {
        let mut out = Vec::new();
        for ev in self.splitter.feed(data) {
            out.push(match ev {
                Event::Message(m) => match self.handle(&m).await {
                    Some(r) => r,
                    None => continue,
                },
                Event::TooLarge { len } => error_reply(
                    QgaError::generic(format!(
                        "request of {len} bytes exceeds the limit of {} bytes (max-message-bytes)",
                        self.agent.config().max_message_bytes
                    )),
                    None,
                ),
                Event::TooDeep => error_reply(QgaError::generic("JSON nesting too deep"), None),
                Event::Unbalanced => error_reply(QgaError::generic("JSON parse error, stray '}' or ']'"), None),
                Event::Interrupted => error_reply(
                    QgaError::generic("JSON parse error, message interrupted by a 0xFF reset byte; it was dropped"),
                    None,
                ),
            });
        }
        out
    }

    async fn handle(&mut self, msg: &[u8]) -> Option<Reply> {
        let v: Value = match serde_json::from_slice(msg) {
            Ok(v) => v,
            Err(e) => return Some(error_reply(QgaError::generic(format!("JSON parse error, {e}")), None)),
        };
        let Value::Object(mut req) = v else {
            return Some(error_reply(QgaError::generic("QMP input must be a JSON object"), None));
        };
        let id = req.remove("id");
        let r = self.dispatch(req).await;
        Some(match r {
            Ok((value, delimited)) => encode(json!({ "return": value }), id, delimited),
            Err(e) => error_reply(e, id),
        })
    }

    async fn dispatch(&mut self, mut req: Map<String, Value>) -> Result<(Value, bool), QgaError> {
        // Checked in qemu-ga's order: unexpected members, then `execute`, then the command,
        // then whether it is allowed while frozen, and only then its arguments.
        if let Some(k) = req.keys().find(|k| !["execute", "arguments"].contains(&k.as_str())) {
            return Err(QgaError::generic(format!("QMP input member '{k}' is unexpected")));
        }
        let name = match req.remove("execute") {
            Some(Value::String(s)) => s,
            Some(_) => return Err(QgaError::generic("QMP input member 'execute' must be a string")),
            None => return Err(QgaError::generic("QMP input lacks member 'execute'")),
        };
        let args = match req.remove("arguments") {
            None => Map::new(),
            Some(Value::Object(m)) => m,
            Some(_) => return Err(QgaError::generic("QMP input member 'arguments' must be an object")),
        };
        let Some(cmd) = COMMANDS.iter().find(|c| c.name == name) else {
            return Err(QgaError { class: "CommandNotFound", desc: format!("The command {name} has not been found") });
        };
        if !cmd.allowed_while_frozen && self.agent.is_frozen() {
            return Err(QgaError {
                class: "CommandNotFound",
                desc: format!("Command {name} has been disabled: the agent is in frozen state"),
            });
        }
        let mut a = Args::new(args);
        let value = match cmd.name {
            "guest-sync-delimited" | "guest-sync" => {
                let id = a.required("id", Value::as_i64, "integer")?;
                a.done()?;
                return Ok((json!(id), cmd.name == "guest-sync-delimited"));
            }
            "guest-ping" => {
                a.done()?;
                json!({})
            }
            "guest-info" => {
                a.done()?;
                self.info()
            }
            "guest-fsfreeze-status" => {
                a.done()?;
                json!(self.agent.status())
            }
            "guest-fsfreeze-freeze" => {
                a.done()?;
                let r = self.agent.freeze(FreezeRequest { owner: Some(self.channel), ..Default::default() }).await?;
                json!(r.frozen)
            }
            "guest-fsfreeze-freeze-list" => {
                let list = a.list("mountpoints")?;
                a.done()?;
                let req = FreezeRequest { mountpoints: list, owner: Some(self.channel), ..Default::default() };
                json!(self.agent.freeze(req).await?.frozen)
            }
            "guest-fsfreeze-thaw" => {
                a.done()?;
                json!(self.agent.thaw().await?.thawed)
            }
            "vssd-freeze" => {
                let mountpoints = a.list("mountpoints")?;
                let deadline = a.optional("deadline", Value::as_f64, "number")?;
                let policy = a.optional(
                    "cannot-freeze",
                    |v| v.as_str()?.parse::<CannotFreezePolicy>().ok(),
                    "'skip' or 'veto'",
                )?;
                let bind = a.optional("bind-to-channel", Value::as_bool, "bool")?.unwrap_or(true);
                let app_failure = a.optional(
                    "app-failure",
                    |v| v.as_str()?.parse::<AppFailurePolicy>().ok(),
                    "'continue' or 'fail'",
                )?;
                a.done()?;
                let deadline = match deadline {
                    Some(d) if !(d > 0.0 && d <= 86_400.0) => {
                        return Err(QgaError::generic("Parameter 'deadline' must be between 0 and 86400 seconds"))
                    }
                    d => d.map(Duration::from_secs_f64),
                };
                let req = FreezeRequest {
                    mountpoints,
                    deadline,
                    cannot_freeze: policy,
                    owner: bind.then_some(self.channel),
                    app_failure,
                };
                serde_json::to_value(self.agent.freeze(req).await?).expect("report serialises")
            }
            "vssd-thaw" => {
                a.done()?;
                serde_json::to_value(self.agent.thaw().await?).expect("report serialises")
            }
            "vssd-status" => {
                a.done()?;
                self.agent.status_json()
            }
            "vssd-plan" => {
                let mountpoints = a.list("mountpoints")?;
                a.done()?;
                let agent = self.agent.clone();
                let plan = tokio::task::spawn_blocking(move || agent.plan(mountpoints))
                    .await
                    .map_err(|e| QgaError::generic(format!("internal error: {e}")))??;
                let mounts: Vec<_> =
                    plan.mounts.iter().map(|m| crate::service::mount_report(m, m.outcome.name(), None)).collect();
                json!({ "mounts": mounts, "outside-scope": plan.outside_scope, "levels": plan.levels.len() })
            }
            _ => unreachable!("every command in COMMANDS is dispatched"),
        };
        Ok((value, false))
    }

    fn info(&self) -> Value {
        let frozen = self.agent.is_frozen();
        let cmds: Vec<Value> = COMMANDS
            .iter()
            .map(|c| json!({"name": c.name, "enabled": c.allowed_while_frozen || !frozen, "success-response": true}))
            .collect();
        json!({ "version": env!("CARGO_PKG_VERSION"), "supported_commands": cmds })
    }
}

/// Checks arguments the way QEMU's generated marshallers do.
struct Args(Map<String, Value>);

impl Args {
    fn new(m: Map<String, Value>) -> Self {
        Args(m)
    }

    fn optional<T>(&mut self, key: &str, conv: impl Fn(&Value) -> Option<T>, ty: &str) -> Result<Option<T>, QgaError> {
        match self.0.remove(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => conv(&v)
                .map(Some)
                .ok_or_else(|| QgaError::generic(format!("Invalid parameter type for '{key}', expected: {ty}"))),
        }
    }

    /// A list of strings, with QEMU's wording for each kind of wrong type.
    fn list(&mut self, key: &str) -> Result<Option<Vec<PathBuf>>, QgaError> {
        let Some(v) = self.optional(key, |v| v.as_array().cloned(), "array")? else { return Ok(None) };
        v.iter()
            .enumerate()
            .map(|(i, s)| {
                s.as_str().map(PathBuf::from).ok_or_else(|| {
                    QgaError::generic(format!("Invalid parameter type for '{key}[{i}]', expected: string"))
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    fn required<T>(&mut self, key: &str, conv: impl Fn(&Value) -> Option<T>, ty: &str) -> Result<T, QgaError> {
        self.optional(key, conv, ty)?.ok_or_else(|| QgaError::generic(format!("Parameter '{key}' is missing")))
    }

    fn done(self) -> Result<(), QgaError> {
        match self.0.keys().next() {
            Some(k) => Err(QgaError::generic(format!("Parameter '{k}' is unexpected"))),
            None => Ok(()),
        }
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
