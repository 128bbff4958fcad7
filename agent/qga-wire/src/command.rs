//! Requests: the envelope, and the typed [`Command`] the agent runs.
//!
//! A request is `{"execute": NAME, "arguments": {...}, "id": ANY}`. It is checked in qemu-ga's
//! order (docs/qga-wire.md, rule 5): a JSON object; no members but those three; `execute` a
//! string; `arguments` an object; a known command ("has not been found" otherwise); allowed
//! now ("has been disabled: the agent is in frozen state" otherwise); and only then its
//! arguments, with the wording of QEMU's generated marshallers.
//!
//! Every command is declared once, in the `commands!` list below: its variant and argument
//! types, its wire name, whether it may run while frozen, whether a success is answered, and
//! how its arguments are read. `guest-info`'s list (with `success-response`) and the
//! frozen-time set come from that list, and a name that is not
//! in it is an error reply, never a panic. A new command is one entry there.
//!
//! A well-formed request for a name that is not in the list stays a [`Request`] too, so that
//! an agent with a qemu-ga behind it can forward it as it came ([`Request::into_unknown`]);
//! [`Request::command`] answers it "has not been found".

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::reply::QgaError;

/// Declares the commands: generates [`Command`] (with arguments), [`CommandName`] (without),
/// and the one match from a name's arguments to a `Command`.
///
/// Each entry: `Variant { field: Type, .. } = "wire-name", while_frozen: BOOL`, then
/// `, success_response: false` for a command that sends no reply when it succeeds (qemu-ga's
/// `guest-shutdown` and `guest-suspend-*`: the guest is going away), and, when the command
/// takes arguments, `, parse: |a| EXPR` building the variant from `a: &mut Args`.
/// Arguments that are left unread are "unexpected", as in QEMU.
macro_rules! commands {
    ($(
        $(#[doc = $doc:literal])*
        $variant:ident $({ $($field:ident : $ty:ty),* $(,)? })? = $wire:literal,
        while_frozen: $frozen:literal
        $(, success_response: $sr:literal)?
        $(, parse: |$a:ident| $parse:expr)?;
    )*) => {
        /// A command the agent knows, with its arguments checked.
        #[derive(Debug, Clone, PartialEq)]
        pub enum Command {
            $( $(#[doc = $doc])* $variant $({ $($field: $ty),* })?, )*
        }

        /// The name of a command the agent knows, without its arguments.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum CommandName {
            $( #[doc = concat!("`", $wire, "`")] $variant, )*
        }

        impl CommandName {
            /// Every command, in the order `guest-info` lists them.
            pub const ALL: &'static [CommandName] = &[$(CommandName::$variant),*];

            /// The name on the wire.
            pub fn as_str(self) -> &'static str {
                match self { $(CommandName::$variant => $wire,)* }
            }

            /// Whether it runs while filesystems are frozen (qemu-ga's "fsfreeze-safe" set,
            /// and vssd's read-only and thaw commands).
            pub fn allowed_while_frozen(self) -> bool {
                match self { $(CommandName::$variant => $frozen,)* }
            }

            /// Whether a success gets a reply (`guest-info`'s `success-response`); errors
            /// always do.
            pub fn success_response(self) -> bool {
                match self { $(CommandName::$variant => commands!(@success $($sr)?),)* }
            }

            /// The command of this wire name, if the agent knows it.
            pub fn from_wire(name: &str) -> Option<CommandName> {
                match name {
                    $($wire => Some(CommandName::$variant),)*
                    _ => None,
                }
            }

            fn parse_arguments(self, args: &mut Args) -> Result<Command, QgaError> {
                match self {
                    $(CommandName::$variant => commands!(@parse args, $variant $(, $a, $parse)?),)*
                }
            }
        }

        impl Command {
            /// Its name.
            pub fn name(&self) -> CommandName {
                match self { $(Command::$variant { .. } => CommandName::$variant,)* }
            }
        }
    };
    (@success) => { true };
    (@success $sr:literal) => { $sr };
    (@parse $args:ident, $variant:ident) => { Ok(Command::$variant) };
    (@parse $args:ident, $variant:ident, $a:ident, $parse:expr) => {{
        let $a: &mut Args = $args;
        Ok($parse)
    }};
}

commands! {
    /// Answers `id` after a 0xFF byte, so a client can find the answer after a reset.
    SyncDelimited { id: i64 } = "guest-sync-delimited", while_frozen: true,
        parse: |a| Command::SyncDelimited { id: a.required("id", Value::as_i64, "integer")? };
    /// Answers `id`, to pair replies with requests.
    Sync { id: i64 } = "guest-sync", while_frozen: true,
        parse: |a| Command::Sync { id: a.required("id", Value::as_i64, "integer")? };
    /// Answers `{}`.
    Ping = "guest-ping", while_frozen: true;
    /// The agent's version and commands, each with whether it is enabled now.
    Info = "guest-info", while_frozen: true;
    /// The wall clock, in nanoseconds since the epoch (microsecond resolution, as qemu-ga).
    GetTime = "guest-get-time", while_frozen: false;
    /// Sets the clock to `time` (ns) and the RTC from it; absent: the clock from the RTC.
    SetTime { time: Option<i64> } = "guest-set-time", while_frozen: false,
        parse: |a| Command::SetTime { time: a.optional("time", Value::as_i64, "integer")? };
    /// The local zone's abbreviation and UTC offset now.
    GetTimezone = "guest-get-timezone", while_frozen: false;
    /// The kernel (uname) and the distribution (os-release).
    GetOsinfo = "guest-get-osinfo", while_frozen: false;
    /// The host name.
    GetHostName = "guest-get-host-name", while_frozen: false;
    /// The logged-in users (utmp), each once, with the earliest login time.
    GetUsers = "guest-get-users", while_frozen: false;
    /// The logical CPUs and whether each is online and can be offlined.
    GetVcpus = "guest-get-vcpus", while_frozen: false;
    /// The memory blocks and whether each is online and can be offlined.
    GetMemoryBlocks = "guest-get-memory-blocks", while_frozen: false;
    /// The size of a memory block.
    GetMemoryBlockInfo = "guest-get-memory-block-info", while_frozen: false;
    /// The network interfaces: hardware address, IP addresses with prefix, statistics.
    NetworkGetInterfaces = "guest-network-get-interfaces", while_frozen: false;
    /// Powers off, halts or reboots (`/sbin/shutdown`); no reply when it works.
    Shutdown { mode: ShutdownMode } = "guest-shutdown", while_frozen: false, success_response: false,
        parse: |a| shutdown(a)?;
    /// Suspends to disk; no reply when it works.
    SuspendDisk = "guest-suspend-disk", while_frozen: false, success_response: false;
    /// Suspends to RAM; no reply when it works.
    SuspendRam = "guest-suspend-ram", while_frozen: false, success_response: false;
    /// Suspends to RAM and disk; no reply when it works.
    SuspendHybrid = "guest-suspend-hybrid", while_frozen: false, success_response: false;
    /// "frozen" or "thawed".
    FsfreezeStatus = "guest-fsfreeze-status", while_frozen: true;
    /// Freezes every eligible filesystem; answers how many.
    FsfreezeFreeze = "guest-fsfreeze-freeze", while_frozen: false;
    /// Freezes the listed mount points (absent: every eligible filesystem); answers how many.
    FsfreezeFreezeList { mountpoints: Option<Vec<PathBuf>> } = "guest-fsfreeze-freeze-list", while_frozen: false,
        parse: |a| Command::FsfreezeFreezeList { mountpoints: a.paths("mountpoints")? };
    /// Thaws; answers how many filesystems.
    FsfreezeThaw = "guest-fsfreeze-thaw", while_frozen: true;
    /// Every mounted filesystem qemu-ga lists, with its disks and usage.
    GetFsinfo = "guest-get-fsinfo", while_frozen: false;
    /// Every block device with a size, its partitions, dependencies, address and alias.
    GetDisks = "guest-get-disks", while_frozen: false;
    /// FITRIM on every mounted filesystem, skipping free extents under `minimum` bytes.
    Fstrim { minimum: Option<i64> } = "guest-fstrim", while_frozen: false,
        parse: |a| Command::Fstrim { minimum: a.optional("minimum", Value::as_i64, "integer")? };
    /// vssd's freeze, with a per-mount report and its own options.
    VssdFreeze {
        mountpoints: Option<Vec<PathBuf>>,
        deadline: Option<Duration>,
        cannot_freeze: Option<CannotFreeze>,
        bind_to_channel: bool,
        app_failure: Option<AppFailure>,
    } = "vssd-freeze", while_frozen: false,
        parse: |a| vssd_freeze(a)?;
    /// Plans and sends PREPARE to the apps ahead of the `vssd-freeze` (same arguments) that
    /// follows on this channel, so that the freeze goes straight to FREEZE + FIFREEZE; kept
    /// for at most `deadline` seconds (default: the freeze deadline), then cancelled.
    VssdFreezePrepare {
        mountpoints: Option<Vec<PathBuf>>,
        deadline: Option<Duration>,
        cannot_freeze: Option<CannotFreeze>,
        bind_to_channel: bool,
        app_failure: Option<AppFailure>,
    } = "vssd-freeze-prepare", while_frozen: false,
        parse: |a| vssd_freeze_prepare(a)?;
    /// vssd's thaw, with a report.
    VssdThaw = "vssd-thaw", while_frozen: true;
    /// vssd's state: what is frozen, the deadline, the last automatic thaw.
    VssdStatus = "vssd-status", while_frozen: true;
    /// What a freeze of these mount points (absent: all) would do, and why.
    VssdPlan { mountpoints: Option<Vec<PathBuf>> } = "vssd-plan", while_frozen: true,
        parse: |a| Command::VssdPlan { mountpoints: a.paths("mountpoints")? };
}

/// `guest-shutdown`'s `mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownMode {
    /// `"powerdown"`, the default: `shutdown -h -P`.
    Powerdown,
    /// `"halt"`: `shutdown -h -H`.
    Halt,
    /// `"reboot"`: `shutdown -h -r`.
    Reboot,
}

fn shutdown(a: &mut Args) -> Result<Command, QgaError> {
    let mode = a.optional("mode", |v| v.as_str().map(str::to_owned), "string")?;
    // qemu-ga's marshaller takes any string; the command itself then refuses an unknown one,
    // after the unexpected-member check, with this wording (its closing parenthesis missing).
    a.done()?;
    let mode = match mode.as_deref() {
        None | Some("powerdown") => ShutdownMode::Powerdown,
        Some("halt") => ShutdownMode::Halt,
        Some("reboot") => ShutdownMode::Reboot,
        Some(_) => return Err(QgaError::generic("mode is invalid (valid values are: halt|powerdown|reboot")),
    };
    Ok(Command::Shutdown { mode })
}

/// `vssd-freeze`'s `cannot-freeze`: what to do with a filesystem that cannot be frozen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CannotFreeze {
    /// `"skip"`: report it and freeze the rest.
    Skip,
    /// `"veto"`: fail before anything is frozen.
    Veto,
}

/// `vssd-freeze`'s `app-failure`: what a failing application or hook does to the freeze.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppFailure {
    /// `"continue"`: report it and freeze the rest.
    Continue,
    /// `"fail"`: fail before any filesystem is frozen.
    Fail,
}

/// The longest `vssd-freeze` deadline, in seconds (a day).
const MAX_DEADLINE_SECS: f64 = 86_400.0;

fn vssd_freeze(a: &mut Args) -> Result<Command, QgaError> {
    let mountpoints = a.paths("mountpoints")?;
    let deadline = a.optional("deadline", Value::as_f64, "number")?;
    let cannot_freeze = a.optional(
        "cannot-freeze",
        |v| match v.as_str()? {
            "skip" => Some(CannotFreeze::Skip),
            "veto" => Some(CannotFreeze::Veto),
            _ => None,
        },
        "'skip' or 'veto'",
    )?;
    let bind_to_channel = a.optional("bind-to-channel", Value::as_bool, "bool")?.unwrap_or(true);
    let app_failure = a.optional(
        "app-failure",
        |v| match v.as_str()? {
            "continue" => Some(AppFailure::Continue),
            "fail" => Some(AppFailure::Fail),
            _ => None,
        },
        "'continue' or 'fail'",
    )?;
    // An unexpected member is reported before a deadline out of range, as always.
    a.done()?;
    let deadline = match deadline {
        // Written so that NaN is out of range too.
        Some(d) if !(d > 0.0 && d <= MAX_DEADLINE_SECS) => {
            return Err(QgaError::generic("Parameter 'deadline' must be between 0 and 86400 seconds"))
        }
        d => d.map(Duration::from_secs_f64),
    };
    Ok(Command::VssdFreeze { mountpoints, deadline, cannot_freeze, bind_to_channel, app_failure })
}

/// `vssd-freeze-prepare`: the arguments of the `vssd-freeze` it prepares.
fn vssd_freeze_prepare(a: &mut Args) -> Result<Command, QgaError> {
    match vssd_freeze(a)? {
        Command::VssdFreeze { mountpoints, deadline, cannot_freeze, bind_to_channel, app_failure } => {
            Ok(Command::VssdFreezePrepare { mountpoints, deadline, cannot_freeze, bind_to_channel, app_failure })
        }
        other => Ok(other),
    }
}

/// A request whose envelope has been read: the top-level `id` (echoed in any reply) and the
/// request, or the error to answer with.
#[derive(Debug)]
pub struct Incoming {
    /// The top-level `id`, any JSON value; None when absent or when the message was not an
    /// object.
    pub id: Option<Value>,
    /// The request, or why it is refused.
    pub request: Result<Request, QgaError>,
}

impl Incoming {
    /// Reads one message (a complete JSON text from [`crate::stream::Splitter`]).
    pub fn parse(msg: &[u8]) -> Incoming {
        let refused = |e: QgaError| Incoming { id: None, request: Err(e) };
        let v: Value = match serde_json::from_slice(msg) {
            Ok(v) => v,
            Err(e) => return refused(QgaError::generic(format!("JSON parse error, {e}"))),
        };
        let Value::Object(mut members) = v else {
            return refused(QgaError::generic("QMP input must be a JSON object"));
        };
        let id = members.remove("id");
        Incoming { id, request: Request::from_members(members) }
    }
}

/// qemu-ga 7.2's `ga_freeze_allowlist` (qga/main.c): the only commands it runs while frozen.
/// vssd implements every one of them itself, so while frozen nothing is forwarded to a
/// backend qemu-ga in practice; the rule is still applied by name, as qemu-ga does.
pub const QEMU_GA_FREEZE_ALLOWLIST: &[&str] =
    &["guest-ping", "guest-info", "guest-sync", "guest-sync-delimited", "guest-fsfreeze-status", "guest-fsfreeze-thaw"];

/// A request whose envelope is well-formed; its arguments are not checked yet, because
/// qemu-ga checks whether the command is allowed first. Its name is one vssd knows, or one it
/// does not: that one is `CommandNotFound` ([`Request::command`]) unless a backend qemu-ga
/// takes it ([`Request::into_unknown`]).
#[derive(Debug, Clone)]
pub struct Request {
    name: Result<CommandName, String>,
    /// None when the request had no `arguments` member (forwarded as it came).
    arguments: Option<Map<String, Value>>,
}

impl Request {
    fn from_members(mut m: Map<String, Value>) -> Result<Request, QgaError> {
        if let Some(k) = m.keys().find(|k| !["execute", "arguments"].contains(&k.as_str())) {
            return Err(QgaError::generic(format!("QMP input member '{k}' is unexpected")));
        }
        let name = match m.remove("execute") {
            Some(Value::String(s)) => s,
            Some(_) => return Err(QgaError::generic("QMP input member 'execute' must be a string")),
            None => return Err(QgaError::generic("QMP input lacks member 'execute'")),
        };
        let arguments = match m.remove("arguments") {
            None => None,
            Some(Value::Object(a)) => Some(a),
            Some(_) => return Err(QgaError::generic("QMP input member 'arguments' must be an object")),
        };
        let name = CommandName::from_wire(&name).ok_or(name);
        Ok(Request { name, arguments })
    }

    /// The command asked for, if vssd knows it.
    pub fn name(&self) -> Option<CommandName> {
        self.name.as_ref().ok().copied()
    }

    /// The name as the host sent it.
    pub fn wire_name(&self) -> &str {
        match &self.name {
            Ok(n) => n.as_str(),
            Err(s) => s,
        }
    }

    /// The command with its arguments checked; `frozen` says whether filesystems are frozen
    /// now, which disables some commands before their arguments are looked at. A name vssd
    /// does not know is `CommandNotFound`, frozen or not.
    pub fn command(self, frozen: bool) -> Result<Command, QgaError> {
        let name = self.name.map_err(|n| QgaError::not_found(&n))?;
        if frozen && !name.allowed_while_frozen() {
            return Err(QgaError::disabled_while_frozen(name.as_str()));
        }
        let mut args = Args(self.arguments.unwrap_or_default());
        let cmd = name.parse_arguments(&mut args)?;
        args.done()?;
        Ok(cmd)
    }

    /// The request as it came, when vssd does not know its name (to forward it to a backend);
    /// else the request back.
    pub fn into_unknown(self) -> Result<Unknown, Request> {
        match self.name {
            Err(name) => Ok(Unknown { name, arguments: self.arguments }),
            Ok(_) => Err(self),
        }
    }
}

/// A well-formed request for a command vssd does not implement, kept as it came so that a
/// backend qemu-ga can check its arguments with its own errors.
#[derive(Debug, Clone, PartialEq)]
pub struct Unknown {
    /// `execute`, as sent.
    pub name: String,
    /// `arguments`, as sent (None: there was no such member).
    pub arguments: Option<Map<String, Value>>,
}

impl Unknown {
    /// Whether qemu-ga would run it while frozen ([`QEMU_GA_FREEZE_ALLOWLIST`]).
    pub fn allowed_while_frozen(&self) -> bool {
        QEMU_GA_FREEZE_ALLOWLIST.contains(&self.name.as_str())
    }

    /// The request to send on, with `id` as its top-level id (the host's own id stays with
    /// the forwarder, which puts it back on the reply).
    pub fn envelope(&self, id: Value) -> Value {
        let mut m = Map::new();
        m.insert("execute".into(), Value::String(self.name.clone()));
        if let Some(a) = &self.arguments {
            m.insert("arguments".into(), Value::Object(a.clone()));
        }
        m.insert("id".into(), id);
        Value::Object(m)
    }
}

/// A command's arguments, read the way QEMU's generated marshallers read them.
pub struct Args(Map<String, Value>);

impl Args {
    fn optional<T>(&mut self, key: &str, conv: impl Fn(&Value) -> Option<T>, ty: &str) -> Result<Option<T>, QgaError> {
        match self.0.remove(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => conv(&v)
                .map(Some)
                .ok_or_else(|| QgaError::generic(format!("Invalid parameter type for '{key}', expected: {ty}"))),
        }
    }

    fn required<T>(&mut self, key: &str, conv: impl Fn(&Value) -> Option<T>, ty: &str) -> Result<T, QgaError> {
        self.optional(key, conv, ty)?.ok_or_else(|| QgaError::generic(format!("Parameter '{key}' is missing")))
    }

    /// A list of paths, with QEMU's wording for each kind of wrong type.
    fn paths(&mut self, key: &str) -> Result<Option<Vec<PathBuf>>, QgaError> {
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

    /// Fails on the first argument nobody read.
    fn done(&mut self) -> Result<(), QgaError> {
        match self.0.keys().next() {
            Some(k) => Err(QgaError::generic(format!("Parameter '{k}' is unexpected"))),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reply::ErrorClass;
    use serde_json::json;

    fn parse(msg: &str, frozen: bool) -> Result<Command, QgaError> {
        Incoming::parse(msg.as_bytes()).request.and_then(|r| r.command(frozen))
    }

    fn err(msg: &str, frozen: bool) -> QgaError {
        match parse(msg, frozen) {
            Ok(c) => panic!("{msg}: parsed as {c:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn every_command_parses_with_its_arguments() {
        let cases: &[(&str, Command)] = &[
            (r#"{"execute":"guest-sync-delimited","arguments":{"id":42}}"#, Command::SyncDelimited { id: 42 }),
            (r#"{"execute":"guest-sync","arguments":{"id":-5}}"#, Command::Sync { id: -5 }),
            (r#"{"execute":"guest-sync","arguments":{"id":9223372036854775807}}"#, Command::Sync { id: i64::MAX }),
            (r#"{"execute":"guest-ping"}"#, Command::Ping),
            (r#"{"execute":"guest-ping","arguments":{}}"#, Command::Ping),
            (r#"{"execute":"guest-info"}"#, Command::Info),
            (r#"{"execute":"guest-get-time"}"#, Command::GetTime),
            (r#"{"execute":"guest-set-time"}"#, Command::SetTime { time: None }),
            (r#"{"execute":"guest-set-time","arguments":{"time":null}}"#, Command::SetTime { time: None }),
            (
                r#"{"execute":"guest-set-time","arguments":{"time":1700000000123456789}}"#,
                Command::SetTime { time: Some(1_700_000_000_123_456_789) },
            ),
            (r#"{"execute":"guest-set-time","arguments":{"time":-1}}"#, Command::SetTime { time: Some(-1) }),
            (r#"{"execute":"guest-get-timezone"}"#, Command::GetTimezone),
            (r#"{"execute":"guest-get-osinfo"}"#, Command::GetOsinfo),
            (r#"{"execute":"guest-get-host-name"}"#, Command::GetHostName),
            (r#"{"execute":"guest-get-users"}"#, Command::GetUsers),
            (r#"{"execute":"guest-get-vcpus"}"#, Command::GetVcpus),
            (r#"{"execute":"guest-get-memory-blocks"}"#, Command::GetMemoryBlocks),
            (r#"{"execute":"guest-get-memory-block-info"}"#, Command::GetMemoryBlockInfo),
            (r#"{"execute":"guest-network-get-interfaces"}"#, Command::NetworkGetInterfaces),
            (r#"{"execute":"guest-shutdown"}"#, Command::Shutdown { mode: ShutdownMode::Powerdown }),
            (
                r#"{"execute":"guest-shutdown","arguments":{"mode":"powerdown"}}"#,
                Command::Shutdown { mode: ShutdownMode::Powerdown },
            ),
            (
                r#"{"execute":"guest-shutdown","arguments":{"mode":"halt"}}"#,
                Command::Shutdown { mode: ShutdownMode::Halt },
            ),
            (
                r#"{"execute":"guest-shutdown","arguments":{"mode":"reboot"}}"#,
                Command::Shutdown { mode: ShutdownMode::Reboot },
            ),
            (r#"{"execute":"guest-suspend-disk"}"#, Command::SuspendDisk),
            (r#"{"execute":"guest-suspend-ram"}"#, Command::SuspendRam),
            (r#"{"execute":"guest-suspend-hybrid"}"#, Command::SuspendHybrid),
            (r#"{"execute":"guest-fsfreeze-status"}"#, Command::FsfreezeStatus),
            (r#"{"execute":"guest-fsfreeze-freeze"}"#, Command::FsfreezeFreeze),
            (
                r#"{"execute":"guest-fsfreeze-freeze-list","arguments":{"mountpoints":["/a","/b"]}}"#,
                Command::FsfreezeFreezeList { mountpoints: Some(vec!["/a".into(), "/b".into()]) },
            ),
            (
                r#"{"execute":"guest-fsfreeze-freeze-list","arguments":{"mountpoints":[]}}"#,
                Command::FsfreezeFreezeList { mountpoints: Some(vec![]) },
            ),
            (r#"{"execute":"guest-fsfreeze-freeze-list"}"#, Command::FsfreezeFreezeList { mountpoints: None }),
            (r#"{"execute":"guest-fsfreeze-thaw"}"#, Command::FsfreezeThaw),
            (r#"{"execute":"guest-get-fsinfo"}"#, Command::GetFsinfo),
            (r#"{"execute":"guest-get-disks","arguments":{}}"#, Command::GetDisks),
            (r#"{"execute":"guest-fstrim"}"#, Command::Fstrim { minimum: None }),
            (r#"{"execute":"guest-fstrim","arguments":{"minimum":null}}"#, Command::Fstrim { minimum: None }),
            (r#"{"execute":"guest-fstrim","arguments":{"minimum":65536}}"#, Command::Fstrim { minimum: Some(65536) }),
            (r#"{"execute":"guest-fstrim","arguments":{"minimum":-1}}"#, Command::Fstrim { minimum: Some(-1) }),
            (
                r#"{"execute":"vssd-freeze","arguments":{"mountpoints":["/a"],"deadline":2.5,
                    "cannot-freeze":"veto","bind-to-channel":false,"app-failure":"fail"}}"#,
                Command::VssdFreeze {
                    mountpoints: Some(vec!["/a".into()]),
                    deadline: Some(Duration::from_millis(2500)),
                    cannot_freeze: Some(CannotFreeze::Veto),
                    bind_to_channel: false,
                    app_failure: Some(AppFailure::Fail),
                },
            ),
            (
                r#"{"execute":"vssd-freeze","arguments":{"deadline":null,"cannot-freeze":"skip","app-failure":"continue"}}"#,
                Command::VssdFreeze {
                    mountpoints: None,
                    deadline: None,
                    cannot_freeze: Some(CannotFreeze::Skip),
                    bind_to_channel: true,
                    app_failure: Some(AppFailure::Continue),
                },
            ),
            (
                r#"{"execute":"vssd-freeze-prepare","arguments":{"deadline":30,"bind-to-channel":true}}"#,
                Command::VssdFreezePrepare {
                    mountpoints: None,
                    deadline: Some(Duration::from_secs(30)),
                    cannot_freeze: None,
                    bind_to_channel: true,
                    app_failure: None,
                },
            ),
            (r#"{"execute":"vssd-thaw"}"#, Command::VssdThaw),
            (r#"{"execute":"vssd-status"}"#, Command::VssdStatus),
            (r#"{"execute":"vssd-plan"}"#, Command::VssdPlan { mountpoints: None }),
            (
                r#"{"execute":"vssd-plan","arguments":{"mountpoints":["/x"]}}"#,
                Command::VssdPlan { mountpoints: Some(vec!["/x".into()]) },
            ),
        ];
        let mut seen = Vec::new();
        for (msg, want) in cases {
            let got = parse(msg, false).unwrap_or_else(|e| panic!("{msg}: {e}"));
            assert_eq!(&got, want, "{msg}");
            seen.push(got.name());
        }
        for n in CommandName::ALL {
            assert!(seen.contains(n), "no parse case for {}", n.as_str());
        }
    }

    #[test]
    fn names_round_trip_and_are_unique() {
        for (i, n) in CommandName::ALL.iter().enumerate() {
            assert_eq!(CommandName::from_wire(n.as_str()), Some(*n));
            assert!(CommandName::ALL[i + 1..].iter().all(|m| m.as_str() != n.as_str()), "{} twice", n.as_str());
        }
        assert_eq!(CommandName::ALL.len(), 30);
    }

    /// qemu-ga 7.2's guest-info: `success-response` is false for these four only.
    #[test]
    fn only_shutdown_and_suspend_send_no_reply_on_success() {
        let silent: Vec<&str> = CommandName::ALL.iter().filter(|n| !n.success_response()).map(|n| n.as_str()).collect();
        assert_eq!(silent, ["guest-shutdown", "guest-suspend-disk", "guest-suspend-ram", "guest-suspend-hybrid"]);
    }

    /// The platform commands come right after guest-info, in the brief's order, and none of
    /// them runs while frozen (qemu-ga's `ga_freeze_allowlist` has none of them).
    #[test]
    fn platform_commands_follow_guest_info_and_are_disabled_while_frozen() {
        let names: Vec<&str> = CommandName::ALL.iter().map(|n| n.as_str()).collect();
        let at = names.iter().position(|n| *n == "guest-info").unwrap();
        let platform = [
            "guest-get-time",
            "guest-set-time",
            "guest-get-timezone",
            "guest-get-osinfo",
            "guest-get-host-name",
            "guest-get-users",
            "guest-get-vcpus",
            "guest-get-memory-blocks",
            "guest-get-memory-block-info",
            "guest-network-get-interfaces",
            "guest-shutdown",
            "guest-suspend-disk",
            "guest-suspend-ram",
            "guest-suspend-hybrid",
        ];
        assert_eq!(&names[at + 1..at + 1 + platform.len()], platform);
        for n in platform {
            let e = err(&format!(r#"{{"execute":"{n}"}}"#), true);
            assert_eq!(
                (e.class, e.desc),
                (ErrorClass::CommandNotFound, format!("Command {n} has been disabled: the agent is in frozen state"))
            );
        }
    }

    #[test]
    fn the_frozen_set_is_qemu_gas_plus_vssds_read_only_and_thaw_commands() {
        let allowed: Vec<&str> =
            CommandName::ALL.iter().filter(|n| n.allowed_while_frozen()).map(|n| n.as_str()).collect();
        assert_eq!(
            allowed,
            [
                "guest-sync-delimited",
                "guest-sync",
                "guest-ping",
                "guest-info",
                "guest-fsfreeze-status",
                "guest-fsfreeze-thaw",
                "vssd-thaw",
                "vssd-status",
                "vssd-plan"
            ]
        );
    }

    /// docs/qga-wire.md, sections 1, 3 and 5: the errors and their order.
    #[test]
    fn errors_follow_qemu_ga_wording_and_order() {
        use ErrorClass::*;
        let cases: &[(&str, bool, ErrorClass, &str)] = &[
            ("[1,2]", false, GenericError, "QMP input must be a JSON object"),
            ("42", false, GenericError, "QMP input must be a JSON object"),
            ("null", false, GenericError, "QMP input must be a JSON object"),
            ("{}", false, GenericError, "QMP input lacks member 'execute'"),
            (r#"{"foo":1}"#, false, GenericError, "QMP input member 'foo' is unexpected"),
            (r#"{"foo":1,"execute":"guest-ping"}"#, false, GenericError, "QMP input member 'foo' is unexpected"),
            (r#"{"execute":"no-such-cmd","extra":1}"#, false, GenericError, "QMP input member 'extra' is unexpected"),
            (r#"{"execute":123,"extra":1}"#, false, GenericError, "QMP input member 'extra' is unexpected"),
            (r#"{"execute":123}"#, false, GenericError, "QMP input member 'execute' must be a string"),
            (r#"{"execute":null}"#, false, GenericError, "QMP input member 'execute' must be a string"),
            (r#"{"execute":""}"#, false, CommandNotFound, "The command  has not been found"),
            (r#"{"execute":"no-such-cmd"}"#, false, CommandNotFound, "The command no-such-cmd has not been found"),
            (
                r#"{"execute":"no-such-cmd","arguments":{"x":1}}"#,
                false,
                CommandNotFound,
                "The command no-such-cmd has not been found",
            ),
            (
                r#"{"execute":"no-such-cmd","arguments":[]}"#,
                false,
                GenericError,
                "QMP input member 'arguments' must be an object",
            ),
            (r#"{"execute":"guest-sync"}"#, false, GenericError, "Parameter 'id' is missing"),
            (r#"{"execute":"guest-sync","arguments":{}}"#, false, GenericError, "Parameter 'id' is missing"),
            (
                r#"{"execute":"guest-sync","arguments":{"id":1,"foo":2}}"#,
                false,
                GenericError,
                "Parameter 'foo' is unexpected",
            ),
            (r#"{"execute":"guest-sync-delimited"}"#, false, GenericError, "Parameter 'id' is missing"),
            (r#"{"execute":"guest-ping","arguments":{"x":1}}"#, false, GenericError, "Parameter 'x' is unexpected"),
            (
                r#"{"execute":"guest-fsfreeze-freeze-list","arguments":{"mountpoints":"/a"}}"#,
                false,
                GenericError,
                "Invalid parameter type for 'mountpoints', expected: array",
            ),
            (
                r#"{"execute":"guest-fsfreeze-freeze-list","arguments":{"mountpoints":[1]}}"#,
                false,
                GenericError,
                "Invalid parameter type for 'mountpoints[0]', expected: string",
            ),
            (
                r#"{"execute":"guest-fsfreeze-freeze-list","arguments":{"mountpoints":["/a"],"foo":1}}"#,
                false,
                GenericError,
                "Parameter 'foo' is unexpected",
            ),
            // While frozen: the disabled check comes before the arguments.
            (
                r#"{"execute":"guest-fsfreeze-freeze-list","arguments":{"mountpoints":1}}"#,
                true,
                CommandNotFound,
                "Command guest-fsfreeze-freeze-list has been disabled: the agent is in frozen state",
            ),
            (
                r#"{"execute":"guest-fsfreeze-freeze"}"#,
                true,
                CommandNotFound,
                "Command guest-fsfreeze-freeze has been disabled: the agent is in frozen state",
            ),
            (
                r#"{"execute":"vssd-freeze"}"#,
                true,
                CommandNotFound,
                "Command vssd-freeze has been disabled: the agent is in frozen state",
            ),
            (r#"{"execute":"no-such-cmd"}"#, true, CommandNotFound, "The command no-such-cmd has not been found"),
            // The platform commands' arguments, as QEMU's marshallers and qemu-ga word them.
            (r#"{"execute":"guest-get-time","arguments":{"x":1}}"#, false, GenericError, "Parameter 'x' is unexpected"),
            (
                r#"{"execute":"guest-network-get-interfaces","arguments":{"all":true}}"#,
                false,
                GenericError,
                "Parameter 'all' is unexpected",
            ),
            (
                r#"{"execute":"guest-set-time","arguments":{"time":"now"}}"#,
                false,
                GenericError,
                "Invalid parameter type for 'time', expected: integer",
            ),
            (
                r#"{"execute":"guest-set-time","arguments":{"time":1.5}}"#,
                false,
                GenericError,
                "Invalid parameter type for 'time', expected: integer",
            ),
            (
                r#"{"execute":"guest-set-time","arguments":{"time":9223372036854775808}}"#,
                false,
                GenericError,
                "Invalid parameter type for 'time', expected: integer",
            ),
            (
                r#"{"execute":"guest-set-time","arguments":{"tim":1}}"#,
                false,
                GenericError,
                "Parameter 'tim' is unexpected",
            ),
            (
                r#"{"execute":"guest-shutdown","arguments":{"mode":"sleep"}}"#,
                false,
                GenericError,
                "mode is invalid (valid values are: halt|powerdown|reboot",
            ),
            (
                r#"{"execute":"guest-shutdown","arguments":{"mode":""}}"#,
                false,
                GenericError,
                "mode is invalid (valid values are: halt|powerdown|reboot",
            ),
            (
                r#"{"execute":"guest-shutdown","arguments":{"mode":"Reboot"}}"#,
                false,
                GenericError,
                "mode is invalid (valid values are: halt|powerdown|reboot",
            ),
            (
                r#"{"execute":"guest-shutdown","arguments":{"mode":1}}"#,
                false,
                GenericError,
                "Invalid parameter type for 'mode', expected: string",
            ),
            // An unexpected member is reported before a bad mode, as in qemu-ga.
            (
                r#"{"execute":"guest-shutdown","arguments":{"mode":"sleep","x":1}}"#,
                false,
                GenericError,
                "Parameter 'x' is unexpected",
            ),
            (
                r#"{"execute":"guest-shutdown","arguments":{"mode":"sleep"}}"#,
                true,
                CommandNotFound,
                "Command guest-shutdown has been disabled: the agent is in frozen state",
            ),
            (
                r#"{"execute":"guest-suspend-ram","arguments":{"x":1}}"#,
                false,
                GenericError,
                "Parameter 'x' is unexpected",
            ),
            (
                r#"{"execute":"guest-fstrim","arguments":{"minimum":"1"}}"#,
                false,
                GenericError,
                "Invalid parameter type for 'minimum', expected: integer",
            ),
            (
                r#"{"execute":"guest-fstrim","arguments":{"minimum":1.5}}"#,
                false,
                GenericError,
                "Invalid parameter type for 'minimum', expected: integer",
            ),
            (
                r#"{"execute":"guest-fstrim","arguments":{"minimum":1,"x":2}}"#,
                false,
                GenericError,
                "Parameter 'x' is unexpected",
            ),
            (
                r#"{"execute":"guest-get-fsinfo","arguments":{"x":1}}"#,
                false,
                GenericError,
                "Parameter 'x' is unexpected",
            ),
            (
                r#"{"execute":"guest-fstrim","arguments":{"minimum":"bad"}}"#,
                true,
                CommandNotFound,
                "Command guest-fstrim has been disabled: the agent is in frozen state",
            ),
            (
                r#"{"execute":"guest-get-fsinfo"}"#,
                true,
                CommandNotFound,
                "Command guest-get-fsinfo has been disabled: the agent is in frozen state",
            ),
            (
                r#"{"execute":"guest-get-disks"}"#,
                true,
                CommandNotFound,
                "Command guest-get-disks has been disabled: the agent is in frozen state",
            ),
            (
                r#"{"execute":"vssd-freeze","arguments":{"deadline":0}}"#,
                false,
                GenericError,
                "Parameter 'deadline' must be between 0 and 86400 seconds",
            ),
            (
                r#"{"execute":"vssd-freeze","arguments":{"deadline":86401}}"#,
                false,
                GenericError,
                "Parameter 'deadline' must be between 0 and 86400 seconds",
            ),
            (
                r#"{"execute":"vssd-freeze","arguments":{"deadline":0,"x":1}}"#,
                false,
                GenericError,
                "Parameter 'x' is unexpected",
            ),
            (
                r#"{"execute":"vssd-freeze","arguments":{"deadline":"5"}}"#,
                false,
                GenericError,
                "Invalid parameter type for 'deadline', expected: number",
            ),
            (
                r#"{"execute":"vssd-freeze","arguments":{"cannot-freeze":"maybe"}}"#,
                false,
                GenericError,
                "Invalid parameter type for 'cannot-freeze', expected: 'skip' or 'veto'",
            ),
            (
                r#"{"execute":"vssd-freeze","arguments":{"app-failure":1}}"#,
                false,
                GenericError,
                "Invalid parameter type for 'app-failure', expected: 'continue' or 'fail'",
            ),
            (
                r#"{"execute":"vssd-freeze","arguments":{"bind-to-channel":"yes"}}"#,
                false,
                GenericError,
                "Invalid parameter type for 'bind-to-channel', expected: bool",
            ),
        ];
        for (msg, frozen, class, desc) in cases {
            let e = err(msg, *frozen);
            assert_eq!((e.class, e.desc.as_str()), (*class, *desc), "{msg}");
        }
        for id in ["9223372036854775808", "18446744073709551615", "1.5", "1e3", "true", "\"x\""] {
            let e = err(&format!(r#"{{"execute":"guest-sync","arguments":{{"id":{id}}}}}"#), false);
            assert_eq!(e.desc, "Invalid parameter type for 'id', expected: integer", "{id}");
        }
    }

    #[test]
    fn the_id_is_kept_whatever_its_type_and_also_on_errors() {
        for id in [json!(7), json!("abc"), json!({"a": [1, 2]}), Value::Null, json!(true)] {
            let msg = json!({"execute": "no-such-cmd", "id": id.clone()}).to_string();
            let inc = Incoming::parse(msg.as_bytes());
            assert_eq!(inc.id, Some(id));
            assert!(inc.request.and_then(|r| r.command(false)).is_err());
        }
        assert_eq!(Incoming::parse(b"[1]").id, None);
        assert_eq!(Incoming::parse(b"{\"execute\":").id, None);
    }

    /// Odd names and argument shapes: every one is an answer, never a panic, and only one of
    /// qemu-ga's two classes.
    #[test]
    fn no_name_or_argument_shape_panics() {
        let odd_values = [
            json!(null),
            json!(true),
            json!(0),
            json!(-1),
            json!(1.5e308),
            json!(u64::MAX),
            json!(""),
            json!("x\u{0}y"),
            json!("\u{FFFD}"),
            json!([]),
            json!([null]),
            json!([[["deep"]]]),
            json!([1, "a"]),
            json!({}),
            json!({"": {}}),
        ];
        let mut names: Vec<String> = CommandName::ALL.iter().map(|n| n.as_str().to_string()).collect();
        let known = names.clone();
        for n in &known {
            names.extend([
                n.to_uppercase(),
                format!("{n} "),
                format!(" {n}"),
                format!("{n}\u{0}"),
                n[..n.len() - 1].into(),
            ]);
        }
        names.extend(["".into(), "guest-".into(), "vssd-".into(), "é".into(), "x".repeat(10_000), "\u{FFFD}".into()]);
        let keys = [
            "id",
            "mountpoints",
            "deadline",
            "cannot-freeze",
            "bind-to-channel",
            "app-failure",
            "time",
            "mode",
            "minimum",
            "",
            "x",
        ];
        let mut count = 0;
        for name in &names {
            let mut argsets = vec![None, Some(json!([])), Some(json!("a")), Some(json!(null)), Some(json!({}))];
            for k in keys {
                for v in &odd_values {
                    argsets.push(Some(json!({ k: v })));
                }
            }
            for args in argsets {
                let mut msg = json!({ "execute": name });
                if let Some(a) = args {
                    msg["arguments"] = a;
                }
                for frozen in [false, true] {
                    count += 1;
                    match parse(&msg.to_string(), frozen) {
                        Ok(cmd) => assert!(known.contains(&cmd.name().as_str().to_string())),
                        Err(e) => {
                            assert!(!e.desc.is_empty());
                            // `arguments` that is not an object is refused before the lookup.
                            let args_ok = !matches!(msg.get("arguments"), Some(a) if !a.is_object());
                            if !known.contains(name) && args_ok {
                                assert_eq!(e.class, ErrorClass::CommandNotFound, "{msg}: {e}");
                            }
                        }
                    }
                }
            }
        }
        assert!(count > 10_000, "{count}");
        // And envelopes that are not what a client sends.
        for msg in
            ["", " ", "{", "}", "\"execute\"", "{\"execute\":{}}", "{\"execute\":[\"guest-ping\"]}", "{\"id\":1}"]
        {
            let inc = Incoming::parse(msg.as_bytes());
            assert_eq!(inc.request.unwrap_err().class, ErrorClass::GenericError, "{msg}");
        }
    }

    #[test]
    fn qemu_gas_frozen_allowlist_is_all_native_and_allowed_while_frozen() {
        for n in QEMU_GA_FREEZE_ALLOWLIST {
            let c = CommandName::from_wire(n).unwrap_or_else(|| panic!("{n} is not native"));
            assert!(c.allowed_while_frozen(), "{n}");
        }
    }

    #[test]
    fn an_unknown_name_keeps_its_arguments_for_forwarding_and_a_known_one_does_not_forward() {
        let r = Incoming::parse(br#"{"execute":"guest-exec","arguments":{"path":"/bin/true","arg":["x"]},"id":"h"}"#);
        assert_eq!(r.id, Some(json!("h")));
        let u = r.request.unwrap().into_unknown().unwrap();
        assert_eq!(u.name, "guest-exec");
        assert!(!u.allowed_while_frozen());
        assert_eq!(
            u.envelope(json!(17)),
            json!({"execute": "guest-exec", "arguments": {"path": "/bin/true", "arg": ["x"]}, "id": 17})
        );
        // No `arguments` member: none is sent on.
        let u = Incoming::parse(br#"{"execute":"guest-get-devices"}"#).request.unwrap().into_unknown().unwrap();
        assert_eq!(u.envelope(json!(1)), json!({"execute": "guest-get-devices", "id": 1}));
        let r = Incoming::parse(br#"{"execute":"guest-ping"}"#).request.unwrap();
        assert_eq!((r.name(), r.wire_name()), (Some(CommandName::Ping), "guest-ping"));
        assert!(r.into_unknown().is_err());
        // The envelope is checked before anything could be forwarded.
        for bad in [r#"{"execute":"guest-exec","arguments":[]}"#, r#"{"execute":"guest-exec","x":1}"#] {
            assert!(Incoming::parse(bad.as_bytes()).request.is_err(), "{bad}");
        }
    }
}
