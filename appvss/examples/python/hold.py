#!/usr/bin/env python3
"""Hold vssd freezes from Python, speaking the appvss protocol directly (stdlib only).

The protocol is lines of JSON on a unix socket: see appvss/PROTOCOL.md. This example
registers, answers PREPARE with ready (or --veto REASON), on FREEZE "flushes" and answers
held, then holds until THAW, until max_hold_ms has passed, or until vssd goes away,
whichever is first. When vssd is not there or restarts, it reconnects with backoff.

    python3 hold.py [--name NAME] [--socket PATH] [--veto REASON] [--once]

--once exits after the first freeze has ended: 0 if it held until a completed THAW.
"""

import argparse
import json
import os
import random
import socket
import sys
import time

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 65536
DEFAULT_SOCKET = "/run/vssd/appvss.sock"


class ProtocolError(Exception):
    """vssd sent something this client cannot read; the connection is dropped."""


class Connection:
    """One registration: lines of JSON in both directions, at most 64 KiB each."""

    def __init__(self, path, name):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(path)
        self.buf = b""
        self.send({"type": "hello", "id": 1, "name": name,
                   "min_version": PROTOCOL_VERSION, "max_version": PROTOCOL_VERSION})
        welcome = self.recv(timeout=5)
        if welcome is None:
            raise ProtocolError("vssd closed the connection before its welcome")
        if welcome.get("type") == "error":
            raise ProtocolError("vssd refused the registration (%s): %s"
                                % (welcome.get("code"), welcome.get("message")))
        if welcome.get("type") != "welcome" or welcome.get("re") != 1:
            raise ProtocolError("expected a welcome, got %r" % welcome)
        self.app_id = welcome["app_id"]

    def send(self, msg):
        line = json.dumps(msg, separators=(",", ":")).encode() + b"\n"
        assert len(line) <= MAX_MESSAGE_BYTES
        self.sock.sendall(line)

    def recv(self, timeout=None):
        """The next message; None when vssd closed; raises socket.timeout after `timeout`."""
        self.sock.settimeout(timeout)
        while b"\n" not in self.buf:
            if len(self.buf) >= MAX_MESSAGE_BYTES:
                raise ProtocolError("vssd sent a line over 64 KiB")
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        if len(line) + 1 > MAX_MESSAGE_BYTES:
            raise ProtocolError("vssd sent a line over 64 KiB")
        try:
            msg = json.loads(line)
        except ValueError as e:
            raise ProtocolError("vssd sent a line that is not JSON (%s): %r" % (e, line[:200]))
        if not isinstance(msg, dict) or "type" not in msg:
            raise ProtocolError("vssd sent a message without a type: %r" % line[:200])
        return msg

    def close(self):
        self.sock.close()


def flush_everything():
    """A real application writes back its buffers here: COMMIT, checkpoint, fsync."""
    sys.stdout.flush()


def hold_until_thaw(conn, freeze_id, max_hold_ms):
    """Holds (no writes) until THAW for freeze_id, max_hold_ms, or vssd gone. Returns why."""
    until = time.monotonic() + max_hold_ms / 1000.0
    while True:
        left = until - time.monotonic()
        if left <= 0:
            return "max-hold"
        try:
            msg = conn.recv(timeout=left)
        except socket.timeout:
            return "max-hold"
        if msg is None:
            return "disconnected"
        if msg["type"] == "thaw" and msg["freeze_id"] == freeze_id:
            conn.send({"type": "thawed", "re": msg["id"]})
            return msg["reason"]
        if msg["type"] == "error":
            print("vssd: error %s: %s" % (msg.get("code"), msg.get("message")), file=sys.stderr)
            if msg.get("fatal"):
                return "disconnected"


def serve(conn, args):
    """Answers vssd until the connection ends. Returns an exit code with --once, else None."""
    while True:
        msg = conn.recv()
        if msg is None:
            print("vssd closed the connection", file=sys.stderr)
            return None
        kind = msg["type"]
        if kind == "prepare":
            print("prepare freeze_id=%d" % msg["freeze_id"], flush=True)
            if args.veto:
                conn.send({"type": "veto", "re": msg["id"], "reason": args.veto})
            else:
                conn.send({"type": "ready", "re": msg["id"]})
        elif kind == "freeze":
            freeze_id = msg["freeze_id"]
            try:
                flush_everything()
            except Exception as e:  # noqa: BLE001 - any failure is reported to vssd
                conn.send({"type": "failed", "re": msg["id"], "reason": "flush failed: %s" % e})
                continue
            # From here on: no writes until the hold ends.
            conn.send({"type": "held", "re": msg["id"]})
            print("held freeze_id=%d" % freeze_id, flush=True)
            why = hold_until_thaw(conn, freeze_id, msg["max_hold_ms"])
            print("thaw freeze_id=%d release=%s" % (freeze_id, why), flush=True)
            if args.once:
                return 0 if why == "completed" else 1
            if why == "disconnected":
                return None
        elif kind == "thaw":
            # A freeze that ended before its FREEZE reached us (vetoed or aborted).
            conn.send({"type": "thawed", "re": msg["id"]})
            print("thaw freeze_id=%d release=%s" % (msg["freeze_id"], msg["reason"]), flush=True)
            if args.once:
                return 0 if args.veto else 1
        elif kind == "error":
            print("vssd: error %s: %s" % (msg.get("code"), msg.get("message")), file=sys.stderr)
            if msg.get("fatal"):
                return None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", default="python-example")
    p.add_argument("--socket", default=os.environ.get("APPVSS_SOCKET") or DEFAULT_SOCKET)
    p.add_argument("--veto", metavar="REASON")
    p.add_argument("--once", action="store_true")
    args = p.parse_args()

    backoff = 0.1
    while True:
        try:
            conn = Connection(args.socket, args.name)
        except (OSError, ProtocolError) as e:
            print("cannot register with vssd at %s: %s; retrying in %.1f s"
                  % (args.socket, e, backoff), file=sys.stderr)
            time.sleep(backoff * (1 + random.random() / 4))
            backoff = min(backoff * 2, 5.0)
            continue
        backoff = 0.1
        print("connected app_id=%d" % conn.app_id, flush=True)
        try:
            code = serve(conn, args)
        except (OSError, ProtocolError) as e:
            print("connection to vssd lost: %s" % e, file=sys.stderr)
            code = None
        finally:
            conn.close()
        if code is not None:
            return code


if __name__ == "__main__":
    sys.exit(main())
