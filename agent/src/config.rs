//! Configuration: `/etc/vssd/vssd.toml`, overridden by command-line flags.
//!
//! Every key has a default that is safe on a real guest; `vssd --print-config` shows the
//! result of file plus flags. Unknown keys are an error, so a typo never silently falls back
//! to a default.
//!
//! Invariant: a [`Config`] that passed [`Config::validate`] is safe to run with; every error
//! names the key or value at fault and what would be accepted.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::plan::CannotFreezePolicy;

/// Where the host reaches vssd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ChannelSpec {
    /// A unix socket vssd listens on (tests, local tools, the simulated host).
    Unix(PathBuf),
    /// A virtio-serial port found by its name (QEMU's `virtserialport,name=`).
    VirtioSerial(String),
    /// An AF_VSOCK port, from any CID.
    Vsock(u32),
    /// The Hyper-V VSS device of Linux's `hv_utils` driver (`/dev/vmbus/hv_vss`): the host's
    /// backup asks for freeze and thaw through it (docs/hyperv.md).
    HyperV(PathBuf),
}

impl ChannelSpec {
    /// The Hyper-V channel at the kernel's own path.
    pub fn hyperv_default() -> ChannelSpec {
        ChannelSpec::HyperV(kmod_shim::hv::DEVICE_PATH.into())
    }
}

impl std::str::FromStr for ChannelSpec {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let bad = |why: &'static str| ConfigError::Channel { spec: s.to_string(), why };
        if s == "hyperv" {
            return Ok(ChannelSpec::hyperv_default());
        }
        let (kind, rest) =
            s.split_once(':').ok_or(bad("needs a kind: unix:PATH, virtio-serial:NAME, vsock:PORT or hyperv[:PATH]"))?;
        match kind {
            "unix" if !rest.is_empty() => Ok(ChannelSpec::Unix(rest.into())),
            "virtio-serial" if !rest.is_empty() => Ok(ChannelSpec::VirtioSerial(rest.into())),
            "vsock" => {
                rest.parse().map(ChannelSpec::Vsock).map_err(|_| bad("vsock needs a port number, e.g. vsock:1234"))
            }
            "hyperv" if rest.starts_with('/') => Ok(ChannelSpec::HyperV(rest.into())),
            "hyperv" => Err(bad("hyperv takes an absolute device path, e.g. hyperv:/dev/vmbus/hv_vss")),
            _ => Err(bad("use unix:PATH, virtio-serial:NAME, vsock:PORT or hyperv[:PATH]")),
        }
    }
}

impl TryFrom<String> for ChannelSpec {
    type Error = ConfigError;
    fn try_from(s: String) -> Result<Self, ConfigError> {
        s.parse()
    }
}

impl From<ChannelSpec> for String {
    fn from(c: ChannelSpec) -> String {
        c.to_string()
    }
}

impl std::fmt::Display for ChannelSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChannelSpec::Unix(p) => write!(f, "unix:{}", p.display()),
            ChannelSpec::VirtioSerial(n) => write!(f, "virtio-serial:{n}"),
            ChannelSpec::Vsock(p) => write!(f, "vsock:{p}"),
            ChannelSpec::HyperV(p) => write!(f, "hyperv:{}", p.display()),
        }
    }
}

/// What a failing app or hook does to a freeze.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum AppFailurePolicy {
    /// Report it and freeze the rest (filesystem-consistent for that app).
    #[default]
    Continue,
    /// Fail the whole freeze before any filesystem is frozen.
    Fail,
}

impl std::str::FromStr for AppFailurePolicy {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "continue" => Ok(Self::Continue),
            "fail" => Ok(Self::Fail),
            _ => Err(ConfigError::AppFailurePolicy(s.to_string())),
        }
    }
}

/// The settings vssd runs with. Field names are the TOML keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// Channels to serve, all at once.
    pub channels: Vec<ChannelSpec>,
    /// Only mounts at or below this path are ever touched.
    pub scope: PathBuf,
    /// Seconds a freeze may last before vssd thaws by itself.
    pub freeze_deadline: f64,
    /// Seconds vssd waits for the channel that froze to come back before it thaws.
    pub channel_drop_grace: f64,
    /// `skip` (report and go on) or `veto` (fail the request) for filesystems that cannot freeze.
    pub cannot_freeze: CannotFreezePolicy,
    /// Mount points (and everything below them) never frozen.
    pub exclude: Vec<PathBuf>,
    /// Filesystem types never frozen.
    pub exclude_fstypes: Vec<String>,
    /// If not empty, only these mount points (and below) are frozen.
    pub include: Vec<PathBuf>,
    /// Runtime state: the freeze marker and the control socket. Must be on tmpfs (`/run`).
    pub state_dir: PathBuf,
    /// Largest request accepted on a channel, in bytes.
    pub max_message_bytes: usize,
    /// Serve the local control socket `STATE_DIR/vssd.sock` for vssctl.
    pub control_socket: bool,
    /// Serve applications that hold a freeze (appvss) on `app-socket`.
    pub apps: bool,
    /// The app socket; default STATE_DIR/appvss.sock.
    pub app_socket: Option<PathBuf>,
    /// Group that owns the app socket, if it exists (members may register apps).
    pub app_socket_group: String,
    /// Mode of the app socket (TOML octal: 0o660).
    pub app_socket_mode: u32,
    /// Most registrations one uid may hold at once.
    pub app_max_per_uid: usize,
    /// Seconds an app has to answer PREPARE.
    pub app_prepare_deadline: f64,
    /// Seconds an app has to flush and answer HELD.
    pub app_freeze_deadline: f64,
    /// `continue`: an app that vetoes, fails, is late or vanishes is reported and the freeze
    /// goes on (filesystem-consistent for it); `fail`: the freeze fails. Hooks likewise.
    pub app_failure: AppFailurePolicy,
    /// Directories of hook executables, run with `freeze` / `thaw`.
    pub hooks_dirs: Vec<PathBuf>,
    /// Seconds each hook may run before it is killed.
    pub hook_deadline: f64,
    /// Expedited RCU grace periods (`/sys/kernel/rcu_expedited`) while the filesystems
    /// freeze, put back right after: FIFREEZE waits for grace periods, and expedited ones cut
    /// a freeze several-fold in a busy or emulated guest. Off leaves the knob alone.
    pub rcu_expedite: bool,
    /// The mount table to read (a test may point this elsewhere).
    pub mountinfo: PathBuf,
    /// The sysfs root (block topology, virtio-serial ports).
    pub sysfs: PathBuf,
    /// The device directory (virtio-serial port nodes).
    pub devfs: PathBuf,
    /// A qemu-ga listening on this unix socket (`qemu-ga -m unix-listen -p PATH` with its
    /// freeze commands blocked) runs every command vssd does not implement; None: such
    /// commands are `CommandNotFound`.
    pub qga_backend: Option<PathBuf>,
    /// Seconds one command forwarded to the backend may take, connecting included.
    pub qga_backend_timeout: f64,
    /// Serve `org.vssd.Agent` on D-Bus (state, signals, root-only methods). Never on the
    /// freeze path; a missing bus is logged once and tried again, never fatal.
    pub dbus: bool,
    /// The bus to use (a D-Bus address, e.g. `unix:path=/tmp/bus` for tests); None: the
    /// system bus.
    pub dbus_address: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            channels: vec![ChannelSpec::VirtioSerial("org.qemu.guest_agent.0".into())],
            scope: "/".into(),
            freeze_deadline: 60.0,
            channel_drop_grace: 10.0,
            cannot_freeze: CannotFreezePolicy::Skip,
            exclude: vec![],
            exclude_fstypes: vec![],
            include: vec![],
            state_dir: "/run/vssd".into(),
            max_message_bytes: 1 << 20,
            control_socket: true,
            apps: true,
            app_socket: None,
            app_socket_group: "vssd".into(),
            app_socket_mode: 0o660,
            app_max_per_uid: 64,
            app_prepare_deadline: 5.0,
            app_freeze_deadline: 10.0,
            app_failure: AppFailurePolicy::Continue,
            hooks_dirs: vec!["/etc/vssd/hooks.d".into(), "/etc/qemu/fsfreeze-hook.d".into()],
            hook_deadline: 30.0,
            rcu_expedite: true,
            mountinfo: "/proc/self/mountinfo".into(),
            sysfs: "/sys".into(),
            devfs: "/dev".into(),
            qga_backend: None,
            qga_backend_timeout: 10.0,
            dbus: true,
            dbus_address: None,
        }
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path} is not valid")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("channel `{spec}`: {why}")]
    Channel { spec: String, why: &'static str },
    #[error("`{0}` is not an app-failure policy: use continue or fail")]
    AppFailurePolicy(String),
}

/// The default config file; a missing default file means "all defaults".
pub const DEFAULT_PATH: &str = "/etc/vssd/vssd.toml";

impl Config {
    /// Reads a config file. `explicit` says the user named it, so a missing file is an error.
    pub fn load(path: &Path, explicit: bool) -> Result<Config, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.into(), source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => Ok(Config::default()),
            Err(source) => Err(ConfigError::Read { path: path.into(), source }),
        }
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.channels.is_empty() && !self.control_socket {
            return bad(
                "no channels: give at least one (--channel unix:PATH|virtio-serial:NAME|vsock:PORT|hyperv[:PATH])"
                    .into(),
            );
        }
        if !self.scope.is_absolute() {
            return bad(format!("scope `{}` must be an absolute path", self.scope.display()));
        }
        if !(self.freeze_deadline > 0.0 && self.freeze_deadline <= 86_400.0) {
            return bad(format!("freeze-deadline {} must be between 0 and 86400 seconds", self.freeze_deadline));
        }
        if !(self.channel_drop_grace >= 0.0 && self.channel_drop_grace <= 86_400.0) {
            return bad(format!("channel-drop-grace {} must be between 0 and 86400 seconds", self.channel_drop_grace));
        }
        for (name, v) in [
            ("app-prepare-deadline", self.app_prepare_deadline),
            ("app-freeze-deadline", self.app_freeze_deadline),
            ("hook-deadline", self.hook_deadline),
        ] {
            if !(v > 0.0 && v <= 3600.0) {
                return bad(format!("{name} {v} must be between 0 and 3600 seconds"));
            }
        }
        if self.app_socket_mode > 0o777 {
            return bad(format!("app-socket-mode {:o} is not a permission mode (e.g. 0o660)", self.app_socket_mode));
        }
        if self.max_message_bytes < 1024 {
            return bad(format!("max-message-bytes {} is too small (at least 1024)", self.max_message_bytes));
        }
        if let Some(p) = &self.qga_backend {
            if !p.is_absolute() {
                return bad(format!(
                    "qga-backend `{}` must be an absolute path (the backend's unix socket)",
                    p.display()
                ));
            }
        }
        if !(self.qga_backend_timeout > 0.0 && self.qga_backend_timeout <= 3600.0) {
            return bad(format!("qga-backend-timeout {} must be between 0 and 3600 seconds", self.qga_backend_timeout));
        }
        Ok(())
    }

    pub fn freeze_deadline(&self) -> Duration {
        Duration::from_secs_f64(self.freeze_deadline)
    }

    pub fn channel_drop_grace(&self) -> Duration {
        Duration::from_secs_f64(self.channel_drop_grace)
    }

    pub fn control_socket_path(&self) -> PathBuf {
        self.state_dir.join("vssd.sock")
    }

    pub fn app_socket_path(&self) -> PathBuf {
        self.app_socket.clone().unwrap_or_else(|| self.state_dir.join("appvss.sock"))
    }

    pub fn app_prepare_deadline(&self) -> Duration {
        Duration::from_secs_f64(self.app_prepare_deadline)
    }

    pub fn app_freeze_deadline(&self) -> Duration {
        Duration::from_secs_f64(self.app_freeze_deadline)
    }

    pub fn hook_deadline(&self) -> Duration {
        Duration::from_secs_f64(self.hook_deadline)
    }

    pub fn qga_backend_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.qga_backend_timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_specs_parse_and_print_back() {
        for s in ["unix:/run/x.sock", "virtio-serial:org.qemu.guest_agent.0", "vsock:1234", "hyperv:/dev/vmbus/hv_vss"]
        {
            assert_eq!(s.parse::<ChannelSpec>().unwrap().to_string(), s);
        }
        let err = "vsock:abc".parse::<ChannelSpec>().unwrap_err().to_string();
        assert!(err.contains("port number"), "{err}");
        assert!("tcp:1".parse::<ChannelSpec>().is_err());
        // `hyperv` alone is the kernel's device; a path must be absolute.
        assert_eq!("hyperv".parse::<ChannelSpec>().unwrap(), ChannelSpec::HyperV("/dev/vmbus/hv_vss".into()));
        assert_eq!("hyperv:/tmp/hv".parse::<ChannelSpec>().unwrap(), ChannelSpec::HyperV("/tmp/hv".into()));
        let err = "hyperv:dev/x".parse::<ChannelSpec>().unwrap_err().to_string();
        assert!(err.contains("absolute"), "{err}");
    }

    #[test]
    fn a_missing_default_file_means_defaults_but_a_named_one_is_an_error() {
        let p = Path::new("/nonexistent/vssd.toml");
        assert_eq!(Config::load(p, false).unwrap(), Config::default());
        assert!(Config::load(p, true).is_err());
    }

    #[test]
    fn file_keys_override_defaults_and_unknown_keys_are_errors() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.toml");
        std::fs::write(
            &p,
            "scope = \"/srv\"\nfreeze-deadline = 5\ncannot-freeze = \"veto\"\nchannels = [\"vsock:9\"]\n",
        )
        .unwrap();
        let c = Config::load(&p, true).unwrap();
        assert_eq!(c.scope, Path::new("/srv"));
        assert_eq!(c.freeze_deadline(), Duration::from_secs(5));
        assert_eq!(c.cannot_freeze, CannotFreezePolicy::Veto);
        assert_eq!(c.channels, vec![ChannelSpec::Vsock(9)]);
        std::fs::write(&p, "freeze_deadlin = 5\n").unwrap();
        let err = Config::load(&p, true).unwrap_err();
        assert_eq!(err.to_string(), format!("config {} is not valid", p.display()), "the source is not repeated");
        let chain = format!("{:#}", anyhow::Error::from(err));
        assert!(chain.contains("is not valid: ") && chain.contains("unknown field"), "{chain}");
    }

    #[test]
    fn validation_names_the_bad_value() {
        let c = Config { freeze_deadline: 0.0, ..Config::default() };
        assert!(c.validate().unwrap_err().to_string().contains("freeze-deadline"));
        let c = Config { scope: "rel".into(), ..Config::default() };
        assert!(c.validate().unwrap_err().to_string().contains("absolute"));
        for t in [0.0, -1.0, 3601.0, f64::NAN] {
            let c = Config { qga_backend_timeout: t, ..Config::default() };
            assert!(c.validate().unwrap_err().to_string().contains("qga-backend-timeout"), "{t}");
        }
        let c = Config { qga_backend: Some("run/qga.sock".into()), ..Config::default() };
        assert!(c.validate().unwrap_err().to_string().contains("qga-backend `run/qga.sock`"));
    }

    #[test]
    fn the_backend_is_off_by_default_and_set_by_its_keys() {
        assert_eq!(Config::default().qga_backend, None);
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.toml");
        std::fs::write(&p, "qga-backend = \"/run/qga-backend.sock\"\nqga-backend-timeout = 2.5\n").unwrap();
        let c = Config::load(&p, true).unwrap();
        c.validate().unwrap();
        assert_eq!(c.qga_backend.as_deref(), Some(Path::new("/run/qga-backend.sock")));
        assert_eq!(c.qga_backend_timeout(), Duration::from_millis(2500));
        // --print-config shows it, and what it prints loads back.
        let text = toml::to_string(&c).unwrap();
        assert!(text.contains("qga-backend = \"/run/qga-backend.sock\""), "{text}");
        assert_eq!(toml::from_str::<Config>(&text).unwrap(), c);
    }

    #[test]
    fn dbus_is_on_by_default_and_its_keys_load() {
        assert!(Config::default().dbus);
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.toml");
        std::fs::write(&p, "dbus = false\ndbus-address = \"unix:path=/tmp/bus\"\n").unwrap();
        let c = Config::load(&p, true).unwrap();
        assert!(!c.dbus);
        assert_eq!(c.dbus_address.as_deref(), Some("unix:path=/tmp/bus"));
    }

    #[test]
    fn the_example_config_in_packaging_parses() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/vssd.toml");
        if p.exists() {
            Config::load(&p, true).unwrap().validate().unwrap();
        }
    }
}
