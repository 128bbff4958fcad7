//! The Hyper-V host's side of the control socket ([`crate::control`]): what tests and the
//! `hv-host` binary use to send VSS requests to an emulated device and read the answers.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

/// What the host got for one request, as the control socket reports it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostAnswer {
    /// The HRESULT.
    pub error: u32,
    /// The flags sent back.
    pub flags: u32,
    /// From the request to the answer, in milliseconds (measured in the guest).
    pub ms: f64,
    /// The kernel dropped the request (the fake THAW).
    pub dropped: bool,
}

/// One connection to a control socket.
pub struct Client {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("hv_emu::client::Client")
    }
}

impl Client {
    /// Connects to a unix socket: the guest's control socket, or on the host the chardev
    /// socket of the virtio-serial port.
    pub fn connect(path: &Path) -> io::Result<Client> {
        Client::from_stream(UnixStream::connect(path)?)
    }

    /// Uses a connected stream.
    pub fn from_stream(s: UnixStream) -> io::Result<Client> {
        Ok(Client { r: BufReader::new(s.try_clone()?), w: s })
    }

    /// Bounds each answer's wait (`None`: forever).
    pub fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.w.set_read_timeout(t)
    }

    /// Sends one request object and reads its answer.
    pub fn call(&mut self, req: &Value) -> io::Result<Value> {
        let mut line = req.to_string();
        line.push('\n');
        self.w.write_all(line.as_bytes())?;
        let mut out = String::new();
        loop {
            out.clear();
            if self.r.read_line(&mut out)? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the control socket closed"));
            }
            // A port may carry the tail of an answer to a client before us: skip what is not
            // a JSON object.
            if let Ok(v) = serde_json::from_str::<Value>(out.trim()) {
                if v.is_object() {
                    return Ok(v);
                }
            }
        }
    }

    fn checked(&mut self, req: &Value) -> io::Result<Value> {
        let v = self.call(req)?;
        if let Some(e) = v["err"].as_str() {
            return Err(io::Error::other(format!("hv-emu: {e}")));
        }
        Ok(v)
    }

    /// Sends a VSS request (`"freeze"`, `"thaw"`, `"hot-backup"`, `"get-dm-info"`, …) and
    /// waits for the kernel's answer.
    pub fn request(&mut self, op: &str) -> io::Result<HostAnswer> {
        let v = self.checked(&json!({"op": op}))?;
        Ok(answer(&v))
    }

    /// Sends a raw operation number with flags.
    pub fn request_raw(&mut self, op: u8, flags: u32) -> io::Result<HostAnswer> {
        let v = self.checked(&json!({"op": op, "flags": flags}))?;
        Ok(answer(&v))
    }

    /// The kernel's fake THAW (hibernation).
    pub fn fake_thaw(&mut self) -> io::Result<()> {
        self.checked(&json!({"op": "fake-thaw"})).map(drop)
    }

    /// Sets the kernel's timers (either may be left as it is).
    pub fn set_timeouts(&mut self, freeze: Option<Duration>, other: Option<Duration>) -> io::Result<Value> {
        let mut req = json!({"op": "timeouts"});
        if let Some(f) = freeze {
            req["freeze_ms"] = json!(f.as_millis() as u64);
        }
        if let Some(o) = other {
            req["other_ms"] = json!(o.as_millis() as u64);
        }
        self.checked(&req)
    }

    /// The kernel's state: `{"state":..,"open":..,"registered":..}`.
    pub fn state(&mut self) -> io::Result<Value> {
        self.checked(&json!({"op": "state"}))
    }

    /// Waits (in the guest) until a daemon has registered and the kernel is ready.
    pub fn wait_ready(&mut self, limit: Duration) -> io::Result<bool> {
        let v = self.checked(&json!({"op": "wait-ready", "ms": limit.as_millis() as u64}))?;
        Ok(v["ready"].as_bool() == Some(true))
    }
}

fn answer(v: &Value) -> HostAnswer {
    HostAnswer {
        error: v["error"].as_u64().unwrap_or(u64::MAX) as u32,
        flags: v["flags"].as_u64().unwrap_or(0) as u32,
        ms: v["ms"].as_f64().unwrap_or(f64::NAN),
        dropped: v["dropped"].as_bool() == Some(true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Emulator;

    #[test]
    fn a_client_talks_to_a_served_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let emu = Emulator::default();
        {
            let (emu, path) = (emu.clone(), path.clone());
            std::thread::spawn(move || crate::control::serve_unix(emu, &path));
        }
        let mut c = None;
        for _ in 0..100 {
            if let Ok(x) = Client::connect(&path) {
                c = Some(x);
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut c = c.unwrap();
        let a = c.request("get-dm-info").unwrap();
        assert_eq!((a.error, a.flags, a.dropped), (0, 0, false));
        assert_eq!(c.request("thaw").unwrap().error, 0x80004005);
        assert!(c.request("bogus").is_err());
        assert_eq!(c.state().unwrap()["open"], false);
    }
}
