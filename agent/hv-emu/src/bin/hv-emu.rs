//! `hv-emu`: the emulated `/dev/vmbus/hv_vss` in a test guest. Serves the character device
//! through CUSE, and takes the Hyper-V host's requests on a unix socket and, when asked, on a
//! virtio-serial port (the host's end is a chardev socket). See the crate's docs.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use hv_emu::{Emulator, Timeouts};

/// Emulates Linux's /dev/vmbus/hv_vss (the Hyper-V VSS device) through CUSE.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The CUSE control device.
    #[arg(long, default_value = "/dev/cuse")]
    cuse: PathBuf,
    /// The device name (devtmpfs creates /dev/NAME).
    #[arg(long, default_value = hv_emu::cuse::DEVNAME)]
    name: String,
    /// The control socket (JSON lines) in this machine.
    #[arg(long, default_value = "/run/hv-emu.sock")]
    socket: PathBuf,
    /// Also take requests on the virtio-serial port with this name (e.g. org.vssd.hvhost.0),
    /// once it exists (it may be hot-plugged later).
    #[arg(long)]
    port: Option<String>,
    /// The kernel's FREEZE timeout, in milliseconds (the kernel: 900000).
    #[arg(long, default_value_t = 900_000)]
    freeze_timeout_ms: u64,
    /// The kernel's timeout for other requests, in milliseconds (the kernel: 30000).
    #[arg(long, default_value_t = 30_000)]
    other_timeout_ms: u64,
    /// Log the kernel's events to stderr.
    #[arg(short, long)]
    verbose: bool,
}

fn main() {
    let a = Args::parse();
    let emu = Emulator::new(Timeouts {
        freeze: Duration::from_millis(a.freeze_timeout_ms),
        other: Duration::from_millis(a.other_timeout_ms),
    });
    if a.verbose {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let tx = std::sync::Mutex::new(tx);
        emu.on_change(move || {
            let _ = tx.lock().map(|t| t.send(()));
        });
        let e = emu.clone();
        let start = std::time::Instant::now();
        std::thread::spawn(move || {
            while rx.recv().is_ok() {
                for ev in e.take_events() {
                    eprintln!("hv-emu: {:10.3} {ev:?}", start.elapsed().as_secs_f64());
                }
            }
        });
    }
    {
        let (emu, path) = (emu.clone(), a.socket.clone());
        std::thread::spawn(move || {
            if let Err(e) = hv_emu::control::serve_unix(emu, &path) {
                eprintln!("hv-emu: control socket {}: {e}", path.display());
            }
        });
    }
    if let Some(name) = a.port.clone() {
        // The port may come later (hot-plugged by a test): look for it until it is there.
        let emu = emu.clone();
        std::thread::spawn(move || {
            let (sys, dev) = (std::path::Path::new("/sys"), std::path::Path::new("/dev"));
            let path = loop {
                match kmod_shim::virtio::find_port(sys, dev, &name) {
                    Ok(p) => break p,
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            };
            eprintln!("hv-emu: control port {name} is {}", path.display());
            if let Err(e) = hv_emu::control::serve_port(emu, &path) {
                eprintln!("hv-emu: control port {}: {e}", path.display());
            }
        });
    }
    if let Err(e) = hv_emu::cuse::serve(emu, &a.cuse, &a.name) {
        eprintln!("hv-emu: {}: {e} (is the cuse module loaded?)", a.cuse.display());
        std::process::exit(1);
    }
}
