//! `hv-host`: plays the Hyper-V host of an emulated `/dev/vmbus/hv_vss` (an `hv-emu` control
//! socket, or on the host the chardev socket of its virtio-serial port). Prints the answer as
//! one JSON line; exits 0 when the request was answered HV_S_OK (or the command succeeded),
//! 1 for another HRESULT, 2 for an error.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde_json::json;

/// Sends a VSS request to an emulated /dev/vmbus/hv_vss and prints the kernel's answer.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The control socket.
    #[arg(long, default_value = "/run/hv-emu.sock")]
    socket: PathBuf,
    /// freeze, thaw, hot-backup, get-dm-info, create, delete, bu-complete, auto-recover, an
    /// operation number, fake-thaw, state, wait-ready, timeouts, destroy.
    op: String,
    /// The request's flags (VSS requests).
    #[arg(long, default_value_t = 0)]
    flags: u32,
    /// For `timeouts`: the FREEZE timeout in milliseconds.
    #[arg(long)]
    freeze_ms: Option<u64>,
    /// For `timeouts`: the other requests' timeout in milliseconds.
    #[arg(long)]
    other_ms: Option<u64>,
    /// For `wait-ready`: how long, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    ms: u64,
}

fn main() {
    let a = Args::parse();
    let mut c = match hv_emu::client::Client::connect(&a.socket) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hv-host: {}: {e}", a.socket.display());
            std::process::exit(2);
        }
    };
    let mut req = json!({"op": a.op});
    if let Ok(n) = a.op.parse::<u8>() {
        req["op"] = json!(n);
    }
    req["flags"] = json!(a.flags);
    if let Some(f) = a.freeze_ms {
        req["freeze_ms"] = json!(f);
    }
    if let Some(o) = a.other_ms {
        req["other_ms"] = json!(o);
    }
    req["ms"] = json!(a.ms);
    let _ = c.set_timeout(Some(Duration::from_secs(3600)));
    match c.call(&req) {
        Ok(v) => {
            println!("{v}");
            if v["err"].is_string() {
                std::process::exit(2);
            }
            if v["error"].as_u64().is_some_and(|e| e != 0) {
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("hv-host: {e}");
            std::process::exit(2);
        }
    }
}
