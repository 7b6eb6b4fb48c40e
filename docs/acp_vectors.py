#!/usr/bin/env python3
"""ACP version 1 test vectors, built by an implementation independent of the Rust one.

This script encodes each vector from its fields with `struct` and the `msgpack`
package, following docs/acp.md alone. It writes docs/acp-test-vectors.json
(`--write`) or checks that the file matches and that every vector decodes back to
its fields (`--check`, the default; CI runs it). The Rust codec's tests read the same
file, so the two implementations are checked against each other.

    pip install msgpack && python3 docs/acp_vectors.py --check
"""
import json
import struct
import sys
import uuid
from pathlib import Path

import msgpack

HERE = Path(__file__).resolve().parent
OUT = HERE / "acp-test-vectors.json"

TYPES = ["ALLOCATE", "REPORT", "SYNC", "ADJUST", "REGISTER", "REGISTER_ACK",
         "QUERY_CAPABLE_AGENTS", "LIST_AGENTS", "SYNC_ACK", "ENVELOPE", "MEMBERSHIP", "CONTROL"]
TIMESTAMPED, CONTINUATION = 0x10, 0x08
TASK = uuid.UUID("0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f0")


def header(ver, type_code, flags, prio, group, agent, seq, length):
    return struct.pack(">BBBHIHH", (ver << 4) | type_code, flags, prio, group, agent, seq, length)


def to_wire(value):
    """JSON form (as `agentmesh acp decode` prints it) -> msgpack form."""
    if isinstance(value, dict):
        return {k: to_wire_field(k, v) for k, v in value.items()}
    return value


BYTE_FIELDS = {"input", "output", "hash", "body", "trace_id", "gossip"}


def to_wire_field(key, value):
    if value is None:
        return None
    if key == "task":
        return uuid.UUID(value).bytes
    if key in BYTE_FIELDS:
        return bytes.fromhex(value)
    if isinstance(value, dict):
        return to_wire(value) if key != "params" else value
    if isinstance(value, list):
        return [to_wire(v) for v in value]
    return value


def vector(name, description, type_name, payload=None, payload_hex=None, flags=0, prio=0,
           group=0, agent=0, seq=0, timestamp_ms=None):
    code = TYPES.index(type_name)
    if payload is not None:
        body = msgpack.packb(to_wire(payload), use_bin_type=True)
    else:
        body = bytes.fromhex(payload_hex)
    if timestamp_ms is not None:
        flags |= TIMESTAMPED
        body = struct.pack(">Q", timestamp_ms) + body
    assert len(body) <= 0xFFFF, name
    wire = header(1, code, flags, prio, group, agent, seq, len(body)) + body
    v = {
        "name": name,
        "description": description,
        "hex": wire.hex(),
        "header": {"ver": 1, "type": type_name, "type_code": code, "flags": flags, "prio": prio,
                   "group": group, "agent_id": agent, "seq": seq, "len": len(body)},
        "timestamp_ms": timestamp_ms,
    }
    if payload is not None:
        v["payload"] = payload
    else:
        v["payload_decodes"] = False
    return v


def cap(name, tags, capacity):
    return {"name": name, "version": "1.2.0", "tags": tags, "capacity": capacity}


def build():
    valid = [
        vector("allocate-all-zero", "ALLOCATE with every header field at its minimum and empty input",
               "ALLOCATE", {"target": 0, "task": "00000000-0000-0000-0000-000000000000", "segment": 0,
                            "attempt": 0, "capability": "", "timeout_ms": 0, "input": ""}),
        vector("allocate-coordination", "ALLOCATE on the coordination lane, ack requested",
               "ALLOCATE", {"target": 101, "task": str(TASK), "segment": 3, "attempt": 2,
                            "capability": "summarize", "timeout_ms": 30000, "input": "68656c6c6f"},
               flags=0x01, prio=160, group=7, agent=10, seq=42),
        vector("allocate-with-peers", "ALLOCATE naming the workers of the task's other segments (for SYNC)",
               "ALLOCATE", {"target": 102, "task": str(TASK), "segment": 4, "attempt": 1,
                            "capability": "summarize", "timeout_ms": 30000, "input": "",
                            "peers": [101, 103]},
               prio=160, group=7, agent=10, seq=43),
        vector("allocate-with-params", "ALLOCATE carrying the parameters ADJUSTs set for the task so far",
               "ALLOCATE", {"target": 102, "task": str(TASK), "segment": 5, "attempt": 1,
                            "capability": "summarize", "timeout_ms": 30000, "input": "",
                            "params": {"temperature": "0.2"}},
               prio=160, group=7, agent=10, seq=44),
        vector("report-datagram", "REPORT as a timestamped datagram: progress 900 of 1000, degraded",
               "REPORT", {"target": 10, "task": str(TASK), "segment": 3, "attempt": 2,
                          "progress_permille": 900, "health": "degraded", "load": 1,
                          "output": None, "error": None},
               prio=96, group=7, agent=101, seq=1, timestamp_ms=1750000000123),
        vector("report-final-maxima", "final REPORT with group, agent, seq and prio at their maxima",
               "REPORT", {"target": 4294967295, "task": str(TASK), "segment": 4294967295,
                          "attempt": 4294967295, "progress_permille": 1000, "health": "ok",
                          "load": 0, "output": "6f6b", "error": None},
               flags=0x03, prio=255, group=65535, agent=4294967295, seq=65535),
        vector("report-failed", "final REPORT of a failed attempt",
               "REPORT", {"target": 10, "task": str(TASK), "segment": 0, "attempt": 1,
                          "progress_permille": 250, "health": "unhealthy", "load": 0,
                          "output": None, "error": "agent panicked"},
               prio=96, group=7, agent=102, seq=9),
        vector("sync", "SYNC with a 32-byte hash and a small body",
               "SYNC", {"target": 102, "task": str(TASK), "segment": 1, "round": 5,
                        "hash": bytes(range(32)).hex(), "body": "6269643a3432"},
               prio=96, group=7, agent=101, seq=300),
        vector("adjust-urgent", "ADJUST flagged URGENT: cancel every segment of the task at that worker",
               "ADJUST", {"target": 102, "task": str(TASK), "segment": None,
                          "params": {"temperature": "0.2", "top_k": "5"}, "priority": 200,
                          "cancel": True},
               flags=0x04, prio=224, group=7, agent=10, seq=7),
        vector("register", "REGISTER with two capabilities, before an Agent ID is assigned",
               "REGISTER", {"nonce": 18446744073709551615, "agent_type": "summarizer",
                            "capabilities": [cap("summarize", ["en", "gpu"], 4), cap("translate", [], 1)]},
               flags=0x01, prio=160),
        vector("register-ack", "REGISTER_ACK assigning Agent ID 101 in group 7",
               "REGISTER_ACK", {"nonce": 1, "agent": 101, "group": 7}, prio=160, agent=1, seq=1),
        vector("query-capable-agents", "QUERY_CAPABLE_AGENTS with a tag filter and a limit",
               "QUERY_CAPABLE_AGENTS", {"query": 77, "capability": "summarize", "tags": ["en"], "limit": 16},
               prio=160, group=7, agent=10, seq=2),
        vector("list-agents", "LIST_AGENTS with two agents",
               "LIST_AGENTS", {"query": 77, "agents": [
                   {"agent": 101, "node": "node-a", "agent_type": "summarizer", "group": 7,
                    "capability": cap("summarize", ["en"], 4), "load": 0, "health": "ok"},
                   {"agent": 102, "node": "node-b", "agent_type": "summarizer", "group": 7,
                    "capability": cap("summarize", ["en"], 2), "load": 2, "health": "degraded"}]},
               prio=160, group=7, agent=1, seq=3),
        vector("sync-ack", "SYNC_ACK (the draft's COORD_ACK) agreeing with round 5",
               "SYNC_ACK", {"target": 101, "task": str(TASK), "segment": 1, "round": 5,
                            "hash": bytes(range(32)).hex(), "agreed": True},
               prio=96, group=7, agent=102, seq=300),
        vector("envelope", "ENVELOPE request carrying a trace id",
               "ENVELOPE", {"to": "coordinator", "kind": "agentmesh.Submit", "correlation": 9,
                            "reply": False, "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
                            "body": "a3666f6f"},
               prio=96, group=0, agent=0, seq=12),
        vector("membership", "MEMBERSHIP gossip bytes", "MEMBERSHIP", {"gossip": "0102030405"},
               prio=160, seq=65535),
        vector("control-leave", "CONTROL (the highest type code): the node leaves",
               "CONTROL", {"op": "leave", "nonce": 0, "node": "node-c"}, flags=0x04, prio=255),
        vector("fragment-max-len", "first fragment of a large ENVELOPE: 65,535 payload bytes, "
               "every non-timestamp flag set; the payload is a fragment, so it does not decode alone",
               "ENVELOPE", payload_hex=(bytes(range(256)) * 256)[:65535].hex(), flags=0x0f, prio=0,
               group=1, agent=2, seq=3),
        vector("empty-payload", "a header with Payload Length 0: valid framing, undecodable payload",
               "CONTROL", payload_hex="", prio=255),
    ]
    invalid = [
        {"name": "version-0", "hex": header(0, 0, 0, 0, 0, 0, 0, 0).hex(), "error": "unsupported_version"},
        {"name": "version-2", "hex": header(2, 0, 0, 0, 0, 0, 0, 0).hex(), "error": "unsupported_version"},
        {"name": "type-12", "hex": header(1, 12, 0, 0, 0, 0, 0, 0).hex(), "error": "unknown_type"},
        {"name": "type-15", "hex": header(1, 15, 0, 0, 0, 0, 0, 0).hex(), "error": "unknown_type"},
        {"name": "reserved-flag-0x20", "hex": header(1, 9, 0x20, 0, 0, 0, 0, 0).hex(), "error": "reserved_flags"},
        {"name": "reserved-flag-0x80", "hex": header(1, 9, 0x80, 0, 0, 0, 0, 0).hex(), "error": "reserved_flags"},
        {"name": "timestamped-fragment", "hex": (header(1, 1, 0x18, 0, 0, 0, 0, 8) + bytes(8)).hex(),
         "error": "fragmented_timestamp"},
        {"name": "timestamp-too-short", "hex": (header(1, 1, 0x10, 0, 0, 0, 0, 7) + bytes(7)).hex(),
         "error": "missing_timestamp"},
        {"name": "truncated-header", "hex": header(1, 0, 0, 0, 0, 0, 0, 0)[:12].hex(), "error": "truncated"},
        {"name": "truncated-payload", "hex": (header(1, 9, 0, 0, 0, 0, 0, 5) + b"abc").hex(), "error": "truncated"},
        {"name": "report-progress-over-1000", "error": "bad_payload", "hex": (lambda b: (header(1, 1, 0, 96, 0, 0, 0, len(b)) + b).hex())(
            msgpack.packb(to_wire({"target": 1, "task": str(TASK), "segment": 0, "attempt": 1,
                                   "progress_permille": 1001, "health": "ok", "load": 0,
                                   "output": None, "error": None}), use_bin_type=True))},
        {"name": "allocate-not-msgpack-map", "hex": (header(1, 0, 0, 160, 0, 0, 0, 2) + b"\x92\x01").hex(),
         "error": "bad_payload"},
    ]
    return {
        "protocol": "ACP",
        "version": 1,
        "about": "Test vectors for docs/acp.md. `valid`: hex decodes to header, timestamp_ms and payload "
                 "(JSON form: byte fields as lower-case hex, task ids as UUID strings), and encoding those "
                 "fields gives the hex back. `payload_decodes: false` (instead of `payload`) marks a payload that is not decodable on its own: its bytes are the rest of `hex`. "
                 "`invalid`: hex a receiver must refuse, with the reason.",
        "valid": valid,
        "invalid": invalid,
    }


def decode_check(v):
    """Independent decode of a valid vector's hex back to its fields."""
    raw = bytes.fromhex(v["hex"])
    b0, flags, prio, group, agent, seq, length = struct.unpack(">BBBHIHH", raw[:13])
    h = v["header"]
    got = {"ver": b0 >> 4, "type": TYPES[b0 & 15], "type_code": b0 & 15, "flags": flags, "prio": prio,
           "group": group, "agent_id": agent, "seq": seq, "len": length}
    assert got == h, (v["name"], got, h)
    body = raw[13:]
    assert len(body) == length, v["name"]
    ts = None
    if flags & TIMESTAMPED:
        ts, body = struct.unpack(">Q", body[:8])[0], body[8:]
    assert ts == v["timestamp_ms"], v["name"]
    if "payload" in v:
        assert msgpack.unpackb(body, raw=False) == to_wire(v["payload"]), v["name"]


def main():
    built = build()
    text = json.dumps(built, indent=1) + "\n"
    if "--write" in sys.argv:
        OUT.write_text(text)
        print(f"wrote {len(built['valid'])} valid and {len(built['invalid'])} invalid vectors to {OUT}")
        return 0
    for v in built["valid"]:
        decode_check(v)
    if OUT.read_text() != text:
        print(f"{OUT} differs from what this script builds: run with --write and review the diff")
        return 1
    print(f"{len(built['valid'])} valid and {len(built['invalid'])} invalid vectors: file matches, all decode")
    return 0


if __name__ == "__main__":
    sys.exit(main())
