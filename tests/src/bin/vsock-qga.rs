//! vsock-qga: a minimal QGA client over AF_VSOCK, for the VM tier's guest (built static by
//! tests/guest/build.sh). Inside the guest it reaches vssd through `vsock_loopback` (CID 1),
//! since this host has no vhost-vsock: `vsock-qga 1:4444 guest-fsfreeze-status` prints the
//! reply line and exits 0 when it was a `return`.
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Write};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(addr), Some(cmd)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: vsock-qga CID:PORT COMMAND");
        std::process::exit(2);
    };
    let Some((cid, port)) = addr.split_once(':').and_then(|(c, p)| Some((c.parse().ok()?, p.parse().ok()?))) else {
        eprintln!("vsock-qga: CID:PORT, e.g. 1:4444");
        std::process::exit(2);
    };
    let fd = kmod_shim::vsock::connect(cid, port).unwrap_or_else(|e| {
        eprintln!("vsock-qga: connect {addr}: {e}");
        std::process::exit(1);
    });
    let mut s = std::fs::File::from(fd);
    let req = format!("{{\"execute\":{}}}\n", serde_json::Value::String(cmd.clone()));
    s.write_all(req.as_bytes()).expect("send");
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("read the reply");
    print!("{line}");
    let ok = serde_json::from_str::<serde_json::Value>(&line).map(|v| v.get("return").is_some()).unwrap_or(false);
    std::process::exit(if ok { 0 } else { 1 });
}
