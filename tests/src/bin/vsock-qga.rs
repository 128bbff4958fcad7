//! vsock-qga: one QGA command over AF_VSOCK (with the workspace's client, `qga-wire`), for the VM tier's guest (built static by
//! tests/guest/build.sh). Inside the guest it reaches vssd through `vsock_loopback` (CID 1),
//! since this host has no vhost-vsock: `vsock-qga 1:4444 guest-fsfreeze-status` prints the
//! reply line and exits 0 when it was a `return`.
#![forbid(unsafe_code)]

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
    // The workspace's one QGA client speaks over a UnixStream; the calls it makes on it
    // (write, read, SO_RCVTIMEO/SO_SNDTIMEO, shutdown) are those of any stream socket, so it
    // serves a vsock one as well.
    let stream = std::os::unix::net::UnixStream::from(fd);
    let reply = qga_wire::Client::from_stream(stream).and_then(|mut c| c.exchange(cmd, None));
    let reply = reply.unwrap_or_else(|e| {
        eprintln!("vsock-qga: {}", tests::chain(&e));
        std::process::exit(1);
    });
    println!("{reply}");
    std::process::exit(if reply.get("return").is_some() { 0 } else { 1 });
}
