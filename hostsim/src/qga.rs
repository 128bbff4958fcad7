//! vmctl's client of the guest agent (qemu-guest-agent's protocol; vssd speaks it too): the
//! workspace's one QGA client, `qga_wire::Client`, under the names the rest of hostsim uses.
//!
//! vmctl connects to the host side of the agent's virtio-serial port (QEMU's chardev socket)
//! by path, so a channel left deaf by a pause and resume gets a new connection; before each
//! exchange the client resynchronises with 0xFF + `guest-sync-delimited`. See the crate for
//! the details and its tests.

pub use qga_wire::client::{AgentInfo, Client as Qga, ClientError as QgaError};
