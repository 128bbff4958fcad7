//! `appvss`: hold vssd freezes from shell scripts.
//!
//! `appvss hold` registers with vssd and, at each freeze, runs the commands it was given:
//! `--on-freeze` to completion before answering `held`, a `--hold` process that keeps the
//! app's lock for as long as the freeze lasts (stopped at THAW: its stdin closed, then
//! SIGTERM, then SIGKILL, to its whole process group), `--on-thaw` after. Commands run with
//! `sh -c`. Logs go to stderr.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use appvss::client::{Client, Error, Event, FreezeRequest, Options, PrepareRequest, Release};
use clap::{Args, Parser, Subcommand};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

const EXIT_CODES: &str = "\
Exit codes:
  0  done: stopped by SIGTERM or SIGINT (after releasing any hold), or with --once the freeze
     completed while held; for status, vssd is reachable
  1  with --once, the freeze did not complete while held (vetoed, failed, aborted, timed
     out, vssd gone); for status --register, vssd refused the registration
  2  bad usage
  3  vssd unreachable (with --no-reconnect, or for status), or it refused for good
     (no common protocol version)";

#[derive(Parser, Debug)]
#[command(
    name = "appvss",
    version,
    about = "Hold vssd freezes from shell scripts: flush and keep a lock while the VM's disks are snapshotted.",
    after_help = EXIT_CODES
)]
struct Cli {
    /// More logging (-v debug, -vv trace). Logs go to stderr; RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    Hold(HoldArgs),
    Status(StatusArgs),
    /// Print the man page (roff), appvss(1).
    #[command(hide = true)]
    Man,
}

const HOLD_EXAMPLES: &str = "\
Examples:
  # MariaDB/MySQL: a global read lock for the freeze. The lock lives as long as
  # that mysql session; `cat` keeps it open until appvss closes its stdin at THAW.
  appvss hold --name mariadb --ready-line locked --hold \\
    \"{ echo 'FLUSH TABLES WITH READ LOCK;'; echo \\\"SELECT 'locked';\\\"; cat; } | mysql -N\"

  # A spool: pause and drain it before the freeze, resume after.
  appvss hold --name spool \\
    --on-freeze 'spoolctl pause && spoolctl drain' --on-thaw 'spoolctl resume'

  # Veto while a migration runs (non-zero exit vetoes; its stderr is the reason).
  appvss hold --name app \\
    --on-prepare 'if test -e /run/app/migrating; then echo migrating >&2; exit 1; fi'

  # One freeze, for a test: exits 0 if it held until a completed THAW.
  appvss hold --name probe --socket /run/vssd/appvss.sock --once

Commands run with sh -c and get APPVSS_NAME, APPVSS_FREEZE_ID, APPVSS_PHASE
(prepare, freeze, hold, thaw), APPVSS_DEADLINE_MS and, at thaw, APPVSS_RELEASE
(completed, aborted, timeout, max-hold, disconnected, closed, none). A hold ends
at vssd's THAW, at vssd's max_hold_ms, or when vssd goes away, whichever is first.
--on-thaw runs after every freeze that ran --on-freeze or held.
";

/// Register with vssd and hold every freeze until THAW, running the commands given.
#[derive(Args, Debug)]
#[command(after_help = HOLD_EXAMPLES)]
struct HoldArgs {
    /// The application's name in vssd's reports (1 to 128 bytes).
    #[arg(long)]
    name: String,
    /// vssd's app socket.
    #[arg(long, env = "APPVSS_SOCKET", default_value = appvss::proto::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// At PREPARE: a command that decides; non-zero exit vetoes, with its stderr as the reason.
    #[arg(long, value_name = "CMD")]
    on_prepare: Option<String>,
    /// At FREEZE: a command run to completion before answering held (flush, checkpoint,
    /// pause). Non-zero exit, or not done by vssd's deadline, answers failed with its stderr.
    #[arg(long, value_name = "CMD")]
    on_freeze: Option<String>,
    /// At FREEZE, after --on-freeze: a process that holds the app's lock for the freeze. Held
    /// is answered when it prints --ready-line (or at once without one); at THAW its stdin is
    /// closed, then its process group gets SIGTERM, then SIGKILL.
    #[arg(long, value_name = "CMD")]
    hold: Option<String>,
    /// Text that the --hold process prints (on a line of its stdout) once it holds the lock.
    #[arg(long, value_name = "TEXT", requires = "hold")]
    ready_line: Option<String>,
    /// At THAW: a command run after the hold ended (resume).
    #[arg(long, value_name = "CMD")]
    on_thaw: Option<String>,
    /// Exit after the first freeze has ended (see the exit codes).
    #[arg(long)]
    once: bool,
    /// Exit (code 3) instead of retrying when vssd is not there or goes away.
    #[arg(long)]
    no_reconnect: bool,
    /// How long the --hold process gets to exit after its stdin closes, and again after
    /// SIGTERM, before the next step.
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    stop_grace_ms: u64,
}

/// Check that vssd's app socket accepts connections.
///
/// By default this only connects: a registration would take part in a freeze running at that
/// moment (and under vssd's `app-failure = fail` policy, leaving at once would fail it).
#[derive(Args, Debug)]
struct StatusArgs {
    /// vssd's app socket.
    #[arg(long, env = "APPVSS_SOCKET", default_value = appvss::proto::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Also register (hello / welcome) for a moment, as NAME, and leave.
    #[arg(long, value_name = "NAME", num_args = 0..=1, default_missing_value = "appvss-status")]
    register: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.cmd, Cmd::Man) {
        return match man_page(&mut std::io::stdout().lock()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::from(1),
        };
    }
    let level = match cli.verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    // RUST_LOG takes `level` or `target=level,...`.
    let filter: tracing_subscriber::filter::Targets = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| format!("appvss={level}").parse().expect("a valid filter"));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .finish()
        .with(filter)
        .init();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("appvss: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    let code = rt.block_on(async {
        match cli.cmd {
            Cmd::Hold(a) => hold(a).await,
            Cmd::Status(a) => status(a).await,
            Cmd::Man => unreachable!("handled before the runtime starts"),
        }
    });
    ExitCode::from(code)
}

/// appvss(1): the program's own sections, then one per command (`appvss hold`, `appvss
/// status`) with its synopsis, description, options and examples, then the exit codes.
fn man_page(out: &mut dyn std::io::Write) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut cmd = <Cli as clap::CommandFactory>::command();
    cmd.build();
    let man = clap_mangen::Man::new(cmd.clone()).section("1");
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    man.render_options_section(&mut page)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
        let name = format!("appvss {}", sub.get_name());
        // -v and --help are in appvss's own OPTIONS.
        let sub = sub.clone().bin_name(&name).mut_args(|a| {
            let shared = a.is_global_set() || matches!(a.get_id().as_str(), "help" | "version");
            if shared {
                a.hide(true)
            } else {
                a
            }
        });
        let man = clap_mangen::Man::new(sub.clone());
        let mut text = Vec::new();
        man.render_synopsis_section(&mut text)?;
        man.render_description_section(&mut text)?;
        man.render_options_section(&mut text)?;
        if sub.get_after_help().is_some() {
            man.render_extra_section(&mut text)?;
        }
        let text = String::from_utf8_lossy(&text).replace(".SH EXTRA", ".SH EXAMPLES").replace(".SH ", ".SS ");
        writeln!(page, ".SH \"{}\"", name.to_uppercase())?;
        page.extend_from_slice(text.as_bytes());
    }
    man.render_extra_section(&mut page)?;
    man.render_version_section(&mut page)?;
    // Each piece clap_mangen renders starts with the same preamble: once is enough.
    let page = String::from_utf8_lossy(&page);
    let mut seen = HashSet::new();
    for line in page.lines() {
        if (line.starts_with(".ie ") || line.starts_with(".el ")) && !seen.insert(line) {
            continue;
        }
        let line = if line == ".SH EXTRA" { ".SH \"EXIT STATUS\"" } else { line };
        writeln!(out, "{line}")?;
    }
    Ok(())
}

/// An error and its sources, each once: `Display` of this crate's errors leaves the source out.
fn chain(e: Error) -> String {
    format!("{:#}", anyhow::Error::from(e))
}

// ---------------------------------------------------------------------------------------
// status

async fn status(a: StatusArgs) -> u8 {
    let path = a.socket.display().to_string();
    let report = |ok: bool, code: u8, text: String, extra: serde_json::Value| {
        if a.json {
            let mut v = serde_json::json!({"socket": path, "reachable": ok, "message": text});
            if let (Some(o), serde_json::Value::Object(e)) = (v.as_object_mut(), extra) {
                o.extend(e);
            }
            println!("{v}");
        } else if code == 0 {
            println!("{text}");
        } else {
            eprintln!("appvss: {text}");
        }
        code
    };
    if let Err(e) = tokio::net::UnixStream::connect(&a.socket).await {
        return report(false, 3, format!("vssd is not reachable at {path}: {e}"), serde_json::json!({}));
    }
    let Some(name) = a.register else {
        return report(true, 0, format!("vssd accepts connections at {path}"), serde_json::json!({}));
    };
    let opts = Options::new(name).socket(&a.socket).reconnect(false);
    let mut client = match Client::connect(opts) {
        Ok(c) => c,
        Err(e) => return report(true, 2, chain(e), serde_json::json!({})),
    };
    match tokio::time::timeout(Duration::from_secs(10), client.next_event()).await {
        Ok(Ok(Event::Connected { app_id, version })) => {
            client.close().await;
            report(
                true,
                0,
                format!("vssd at {path} registered this user (app_id {app_id}, protocol version {version})"),
                serde_json::json!({"registered": true, "app_id": app_id, "version": version}),
            )
        }
        Ok(Ok(other)) => report(true, 1, format!("unexpected first event {other:?}"), serde_json::json!({})),
        Ok(Err(e @ Error::Refused { .. })) => report(true, 1, chain(e), serde_json::json!({"registered": false})),
        Ok(Err(e)) => report(false, 3, chain(e), serde_json::json!({})),
        Err(_) => report(true, 3, "no welcome from vssd within 10 s".into(), serde_json::json!({})),
    }
}

// ---------------------------------------------------------------------------------------
// hold

/// SIGTERM or SIGINT.
struct Stop {
    term: Signal,
    int: Signal,
}

impl Stop {
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// How a freeze ended for `hold`.
enum Outcome {
    /// Held, then released for this reason.
    Released(Release),
    /// Not held (failed, or the freeze ended before held).
    NotHeld,
    /// SIGTERM/SIGINT while in the freeze; everything was stopped.
    Stopped,
}

async fn hold(a: HoldArgs) -> u8 {
    let (term, int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("appvss: cannot handle signals: {e}");
            return 1;
        }
    };
    let mut stop = Stop { term, int };
    let opts = Options::new(a.name.clone()).socket(&a.socket).reconnect(!a.no_reconnect);
    let mut client = match Client::connect(opts) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("appvss: {}", chain(e));
            return 2;
        }
    };
    // Freezes whose THAW this loop already handled (inside the freeze), so that their
    // Event::Thaw is not handled twice.
    let mut done: HashSet<u64> = HashSet::new();
    loop {
        let ev = tokio::select! {
            e = client.next_event() => e,
            _ = stop.recv() => {
                tracing::info!("stopping");
                client.close().await;
                return 0;
            }
        };
        match ev {
            Err(e) => {
                tracing::error!("{}", chain(e));
                return 3;
            }
            Ok(Event::Connected { app_id, .. }) => {
                tracing::info!(app_id, "registered with vssd as {:?}", a.name);
            }
            Ok(Event::Disconnected(e)) => {
                tracing::warn!("vssd went away ({}); reconnecting", chain(e));
            }
            Ok(Event::Prepare(req)) => prepare(&a, req).await,
            Ok(Event::Freeze(req)) => {
                let freeze_id = req.freeze_id();
                done.insert(freeze_id);
                let ran_on_freeze = a.on_freeze.is_some();
                let outcome = freeze(&a, req, &mut stop).await;
                let release = match &outcome {
                    Outcome::Released(r) => Some(*r),
                    Outcome::Stopped => Some(Release::ClientClosed),
                    Outcome::NotHeld => None,
                };
                if ran_on_freeze || release.is_some() {
                    on_thaw(&a, freeze_id, release).await;
                }
                match outcome {
                    Outcome::Stopped => {
                        client.close().await;
                        return 0;
                    }
                    Outcome::Released(r) if a.once => {
                        client.close().await;
                        return if r.is_completed() { 0 } else { 1 };
                    }
                    Outcome::NotHeld if a.once => {
                        client.close().await;
                        return 1;
                    }
                    _ => {}
                }
            }
            Ok(Event::Thaw(t)) => {
                if done.remove(&t.freeze_id) {
                    continue;
                }
                tracing::info!(freeze_id = t.freeze_id, release = %t.release, "freeze ended before FREEZE reached this app");
                if a.once {
                    client.close().await;
                    return 1;
                }
            }
            Ok(other) => tracing::debug!(?other, "event ignored"),
        }
    }
}

fn env(a: &HoldArgs, freeze_id: u64, phase: &str, deadline: Option<Instant>) -> Vec<(String, String)> {
    let mut v = vec![
        ("APPVSS_NAME".to_string(), a.name.clone()),
        ("APPVSS_FREEZE_ID".to_string(), freeze_id.to_string()),
        ("APPVSS_PHASE".to_string(), phase.to_string()),
    ];
    if let Some(d) = deadline {
        v.push(("APPVSS_DEADLINE_MS".into(), d.saturating_duration_since(Instant::now()).as_millis().to_string()));
    }
    v
}

async fn prepare(a: &HoldArgs, req: PrepareRequest) {
    let freeze_id = req.freeze_id();
    let Some(cmd) = &a.on_prepare else {
        tracing::info!(freeze_id, "PREPARE: ready");
        return req.ready();
    };
    match run(cmd, env(a, freeze_id, "prepare", Some(req.deadline())), req.deadline()).await {
        Ok(()) => {
            tracing::info!(freeze_id, "PREPARE: --on-prepare succeeded: ready");
            req.ready()
        }
        Err(reason) => {
            tracing::warn!(freeze_id, "PREPARE: vetoing: {reason}");
            req.veto(reason)
        }
    }
}

async fn freeze(a: &HoldArgs, req: FreezeRequest, stop: &mut Stop) -> Outcome {
    let freeze_id = req.freeze_id();
    let deadline = req.deadline();
    if let Some(cmd) = &a.on_freeze {
        let r = tokio::select! {
            r = run(cmd, env(a, freeze_id, "freeze", Some(deadline)), deadline) => r,
            _ = stop.recv() => {
                req.failed("appvss was stopped during --on-freeze");
                return Outcome::Stopped;
            }
        };
        if let Err(reason) = r {
            tracing::warn!(freeze_id, "FREEZE: --on-freeze failed: {reason}");
            req.failed(format!("--on-freeze: {reason}"));
            return Outcome::NotHeld;
        }
        if req.is_over() {
            tracing::warn!(freeze_id, "the freeze ended while --on-freeze ran");
            return Outcome::NotHeld;
        }
    }
    let mut holder = None;
    if let Some(cmd) = &a.hold {
        let mut h = match Holder::start(cmd, env(a, freeze_id, "hold", Some(deadline))) {
            Ok(h) => h,
            Err(e) => {
                req.failed(format!("--hold: cannot start: {e}"));
                return Outcome::NotHeld;
            }
        };
        let ready = tokio::select! {
            r = h.ready(a.ready_line.as_deref(), deadline) => r,
            _ = stop.recv() => Err("appvss was stopped".into()),
        };
        if let Err(reason) = ready {
            tracing::warn!(freeze_id, "FREEZE: --hold not ready: {reason}");
            req.failed(format!("--hold: {reason}"));
            h.stop(Duration::from_millis(a.stop_grace_ms)).await;
            return Outcome::NotHeld;
        }
        holder = Some(h);
    }
    let hold = req.held();
    tracing::info!(freeze_id, "FREEZE: holding");
    let mut exited = false;
    let outcome = loop {
        tokio::select! {
            r = hold.released() => break Outcome::Released(r),
            _ = stop.recv() => break Outcome::Stopped,
            status = async { holder.as_mut().unwrap().child.wait().await }, if holder.is_some() && !exited => {
                exited = true;
                tracing::error!(freeze_id, ?status, "the --hold process exited while holding: its lock is gone, the snapshot may not be consistent for this app");
            }
        }
    };
    if let Some(h) = holder {
        h.stop(Duration::from_millis(a.stop_grace_ms)).await;
    }
    match outcome {
        Outcome::Released(r) => tracing::info!(freeze_id, release = %r, "hold ended"),
        _ => tracing::info!(freeze_id, "stopped while holding; hold ended"),
    }
    drop(hold);
    outcome
}

async fn on_thaw(a: &HoldArgs, freeze_id: u64, release: Option<Release>) {
    let Some(cmd) = &a.on_thaw else { return };
    let mut e = env(a, freeze_id, "thaw", None);
    e.push(("APPVSS_RELEASE".into(), release.map_or("none", Release::as_str).into()));
    // A thaw command should be quick; it gets a minute before it is killed.
    if let Err(reason) = run(cmd, e, Instant::now() + Duration::from_secs(60)).await {
        tracing::error!(freeze_id, "--on-thaw failed: {reason}");
    }
}

fn shell(cmd: &str, env: Vec<(String, String)>) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c").arg(cmd).envs(env).process_group(0).kill_on_drop(true);
    c
}

/// The last 2 KiB of a child's stderr, also echoed line by line to ours.
struct Tail {
    text: Arc<Mutex<String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Tail {
    fn collect<R: AsyncRead + Unpin + Send + 'static>(r: R, what: &'static str) -> Tail {
        let text = Arc::new(Mutex::new(String::new()));
        let t = text.clone();
        let task = tokio::spawn(async move {
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("{what}: {line}");
                let mut s = t.lock().unwrap_or_else(|p| p.into_inner());
                s.push_str(&line);
                s.push('\n');
                if s.len() > 2048 {
                    let cut = s.len() - 2048;
                    let cut = (cut..s.len()).find(|&i| s.is_char_boundary(i)).unwrap_or(s.len());
                    s.drain(..cut);
                }
            }
        });
        Tail { text, task }
    }

    /// What the child wrote, once its stderr has closed (it exited; at most 500 ms more for
    /// anything it started that still holds the pipe).
    async fn text(&mut self) -> String {
        let _ = tokio::time::timeout(Duration::from_millis(500), &mut self.task).await;
        self.text.lock().unwrap_or_else(|p| p.into_inner()).trim().to_string()
    }
}

/// Runs a command to its end before `deadline`; `Err` with its stderr (or what happened).
async fn run(cmd: &str, env: Vec<(String, String)>, deadline: Instant) -> Result<(), String> {
    let mut c = shell(cmd, env);
    c.stdin(Stdio::null()).stderr(Stdio::piped());
    let mut child = c.spawn().map_err(|e| format!("cannot run sh: {e}"))?;
    let mut tail = Tail::collect(child.stderr.take().expect("piped"), "command");
    let status = tokio::select! {
        s = child.wait() => s.map_err(|e| e.to_string())?,
        _ = tokio::time::sleep_until(deadline.into()) => {
            kill_group(child.id().map(|p| p as i32), nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait().await;
            return Err(format!("{cmd:?} did not finish by vssd's deadline; killed"));
        }
    };
    if status.success() {
        return Ok(());
    }
    let err = tail.text().await;
    let how = match status.code() {
        Some(c) => format!("exit status {c}"),
        None => format!("{status}"),
    };
    Err(if err.is_empty() { format!("{cmd:?} failed ({how})") } else { format!("{err} ({how})") })
}

fn kill_group(pgid: Option<i32>, sig: nix::sys::signal::Signal) {
    if let Some(pgid) = pgid {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), sig);
    }
}

/// The --hold process.
struct Holder {
    child: Child,
    /// Its pid, which is also its process group's id (kept: `child.id()` forgets it once reaped).
    pgid: Option<i32>,
    stdin: Option<tokio::process::ChildStdin>,
    stdout: Option<tokio::io::Lines<BufReader<tokio::process::ChildStdout>>>,
    stderr: Tail,
}

impl Holder {
    fn start(cmd: &str, env: Vec<(String, String)>) -> std::io::Result<Holder> {
        let mut c = shell(cmd, env);
        c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = c.spawn()?;
        let pgid = child.id().map(|p| p as i32);
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().map(|o| BufReader::new(o).lines());
        let stderr = Tail::collect(child.stderr.take().expect("piped"), "hold");
        Ok(Holder { child, pgid, stdin, stdout, stderr })
    }

    /// Until the ready line (or at once without one); then forwards the rest of its stdout.
    async fn ready(&mut self, line: Option<&str>, deadline: Instant) -> Result<(), String> {
        let mut out = self.stdout.take().expect("stdout");
        let result = match line {
            None => Ok(()),
            Some(want) => {
                let wait = async {
                    loop {
                        match out.next_line().await {
                            Ok(Some(l)) => {
                                println!("{l}");
                                if l.contains(want) {
                                    return Ok(());
                                }
                            }
                            Ok(None) | Err(_) => {
                                let status = self.child.wait().await;
                                let err = self.stderr.text().await;
                                return Err(format!(
                                    "exited before printing {want:?} ({}){}",
                                    status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
                                    if err.is_empty() { String::new() } else { format!(": {err}") }
                                ));
                            }
                        }
                    }
                };
                match tokio::time::timeout_at(deadline.into(), wait).await {
                    Ok(r) => r,
                    Err(_) => Err(format!("did not print {want:?} by vssd's deadline")),
                }
            }
        };
        tokio::spawn(async move {
            while let Ok(Some(l)) = out.next_line().await {
                println!("{l}");
            }
        });
        result
    }

    /// Closes its stdin; waits `grace`; SIGTERM to its process group; waits `grace`; SIGKILL.
    async fn stop(mut self, grace: Duration) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.shutdown().await;
            drop(stdin);
        }
        if tokio::time::timeout(grace, self.child.wait()).await.is_ok() {
            // The leader exited; make sure nothing it started keeps the lock.
            kill_group(self.pgid, nix::sys::signal::Signal::SIGTERM);
            return;
        }
        kill_group(self.pgid, nix::sys::signal::Signal::SIGTERM);
        if tokio::time::timeout(grace, self.child.wait()).await.is_ok() {
            return;
        }
        tracing::warn!("the --hold process ignored SIGTERM; killing it");
        kill_group(self.pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait().await;
    }
}
