//! The QGA side: the stream splitter, request parsing with every command's arguments, and the
//! client's resynchronisation against whatever an agent answers.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use qga_wire::command::Incoming;
use qga_wire::stream::{Event, Splitter};
use qga_wire::{Client, CommandName};
use serde_json::Value;

/// The splitter fed in chunks the input chooses: memory stays bounded by the limit, the
/// events do not depend on how the bytes were cut, and every message parses without panic.
pub fn stream(data: &[u8]) {
    let Some((&cut, data)) = data.split_first() else { return };
    let max = 64 + (cut as usize % 4) * 512;
    let whole = Splitter::new(max).feed(data);
    let mut s = Splitter::new(max);
    let mut pieces = Vec::new();
    let step = 1 + (cut as usize >> 2);
    for chunk in data.chunks(step) {
        pieces.extend(s.feed(chunk));
    }
    assert_eq!(whole, pieces, "the events depend on how the stream was cut ({step}-byte reads)");
    for ev in &whole {
        match ev {
            Event::Message(m) => {
                assert!(m.len() <= max, "a message of {} bytes passed the limit of {max}", m.len());
                parse_everything(m);
            }
            other => assert!(other.error(max).is_some(), "{other:?} has no error reply"),
        }
    }
}

fn parse_everything(m: &[u8]) {
    let Incoming { id, request } = Incoming::parse(m);
    let _ = id;
    if let Ok(r) = request {
        let _ = r.name();
        let _ = r.wire_name().len();
        for frozen in [false, true] {
            let _ = r.clone().command(frozen);
        }
        let _ = r.into_unknown().map(|u| (u.allowed_while_frozen(), u.envelope(Value::Null)));
    }
}

/// One request for a command the input picks, with arguments from the rest of the input
/// (JSON when it parses, else a string): reaches every command's argument parser.
pub fn command(data: &[u8]) {
    let Some((&pick, rest)) = data.split_first() else { return };
    let name = CommandName::ALL[pick as usize % CommandName::ALL.len()].as_str();
    let args: Value = serde_json::from_slice(rest).unwrap_or_else(|_| String::from_utf8_lossy(rest).into());
    let with_id = pick & 0x80 != 0;
    let mut req = serde_json::json!({"execute": name, "arguments": args});
    if with_id {
        req["id"] = Value::from(u64::from(pick));
    }
    parse_everything(serde_json::to_vec(&req).expect("serialises").as_slice());
    // And the raw bytes as a whole message.
    parse_everything(rest);
}

/// The client against an agent that answers with the input: sync (0xFF and
/// `guest-sync-delimited`, then drop what is not the sync's answer), a command, `guest-info`.
/// Whatever comes back, the client returns (an error or a value), never hangs or panics.
pub fn client(data: &[u8]) {
    if data.len() > 48 * 1024 {
        return; // the socket buffer holds it all, so the test needs no writer thread
    }
    let (ours, theirs) = UnixStream::pair().expect("a socket pair");
    let mut agent = theirs;
    agent.write_all(data).expect("the socket buffer holds the input");
    // End of the agent's answers; its read side stays open so the client's writes succeed.
    agent.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut c = Client::from_stream(ours).expect("a client");
    c.set_timeout(Duration::from_millis(200));
    let _ = c.sync();
    let _ = c.command("guest-fsfreeze-status", None, Duration::from_millis(200));
    let _ = c.info(Duration::from_millis(200));
    let _ = c.drain_until_sync();
    drop(agent);
}
