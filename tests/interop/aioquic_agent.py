#!/usr/bin/env python3
"""An agent written against docs/protocol.md on aioquic, an independent QUIC stack, for
tests/interop.rs. It speaks to a teeway gateway the way an agent does, then the way no agent
should, and prints one JSON line of what the gateway answered:

1. HELLO on the first stream; the gateway's WELCOME (its version and the identity it read).
2. Named batches (protocol 3): BATCH{session, seq} then REQUEST frames on a stream each; the ACKs.
3. The first batch again, marked as a retry: acknowledged in full (the gateway replays it once).
4. A stream announcing a frame over the 16 MiB limit: reset, with the code.

Usage: aioquic_agent.py HOST PORT CA CERT KEY BATCHES RECORDS
"""

import asyncio
import json
import random
import ssl
import struct
import sys
import time

from aioquic.asyncio import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import StreamDataReceived, StreamReset

HELLO, WELCOME, REQUEST, ACK, BATCH = 0x01, 0x02, 0x03, 0x04, 0x08


def frame(kind, payload):
    return struct.pack(">IB", 1 + len(payload), kind) + payload


def str16(text):
    raw = text.encode()
    return struct.pack(">H", len(raw)) + raw


def bytes32(raw):
    return struct.pack(">I", len(raw)) + raw


def headers(pairs):
    return struct.pack(">I", len(pairs)) + b"".join(str16(n) + bytes32(v) for n, v in pairs)


def hello():
    return frame(HELLO, struct.pack(">H", 3) + str16("interop") + str16("aioquic-agent"))


def batch(session, seq, retry):
    return frame(BATCH, struct.pack(">QQB", session, seq, 1 if retry else 0))


def request(n, path, body=b""):
    fixed = struct.pack(">QQBB", n, time.time_ns(), 2, 0)  # HTTP/1.1, no flags
    return frame(REQUEST, fixed + str16("interop") + str16("POST" if body else "GET")
                 + bytes32(path.encode())
                 + headers([("host", b"interop.test"), ("x-interop", b"aioquic")]) + bytes32(body))


def decode(data):
    """The frames in `data`, which must hold whole frames only."""
    out = []
    while data:
        length, kind = struct.unpack(">IB", data[:5])
        out.append((kind, data[5:4 + length]))
        data = data[4 + length:]
    return out


class Agent(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.streams = {}

    def quic_event_received(self, event):
        if isinstance(event, (StreamDataReceived, StreamReset)):
            waiter = self.streams.get(event.stream_id)
            if waiter is None:
                return
            if isinstance(event, StreamReset):
                waiter["reset"] = event.error_code
                waiter["done"].set()
            else:
                waiter["data"] += event.data
                if event.end_stream:
                    waiter["done"].set()

    async def exchange(self, payload, end=True):
        """Sends `payload` on a new stream; what came back: ("frames", [...]) or ("reset", code)."""
        stream_id = self._quic.get_next_available_stream_id()
        waiter = {"data": b"", "done": asyncio.Event(), "reset": None}
        self.streams[stream_id] = waiter
        self._quic.send_stream_data(stream_id, payload, end_stream=end)
        self.transmit()
        await asyncio.wait_for(waiter["done"].wait(), 20)
        if waiter["reset"] is not None:
            return "reset", waiter["reset"]
        return "frames", decode(waiter["data"])


async def main():
    host, port, ca, cert, key, batches, records = sys.argv[1:8]
    batches, records = int(batches), int(records)
    config = QuicConfiguration(is_client=True, alpn_protocols=["teeway/3"], server_name="localhost")
    config.load_verify_locations(ca)
    config.load_cert_chain(cert, key)
    config.verify_mode = ssl.CERT_REQUIRED
    report = {}
    async with connect(host, int(port), configuration=config, create_protocol=Agent) as agent:
        kind, frames = await agent.exchange(hello())
        assert kind == "frames" and frames[0][0] == WELCOME, (kind, frames)
        payload = frames[0][1]
        (version,) = struct.unpack(">H", payload[:2])
        (n,) = struct.unpack(">H", payload[2:4])
        rest = payload[4 + n:]
        (m,) = struct.unpack(">H", rest[:2])
        # Version 3 (what this agent offers): nothing after `software`.
        report["welcome"] = {"version": version, "identity": payload[4:4 + n].decode(),
                             "extra_bytes": len(rest) - 2 - m}

        session = random.getrandbits(63) | 1
        first = None
        acks = []
        for seq in range(1, batches + 1):
            body = batch(session, seq, False) + b"".join(
                request(seq * 1000 + i, f"/interop/{seq}/{i}", b"x" * (i * 100)) for i in range(records))
            if first is None:
                first = body
            kind, frames = await agent.exchange(body)
            assert kind == "frames" and frames[0][0] == ACK, (kind, frames)
            acks.append(struct.unpack(">I", frames[0][1])[0])
        report["acks"] = acks

        retry = batch(session, 1, True) + first[len(batch(session, 1, False)):]
        kind, frames = await agent.exchange(retry)
        report["retry_ack"] = struct.unpack(">I", frames[0][1])[0] if kind == "frames" else None

        # 32 MiB announced, 16 bytes sent: refused on the prefix.
        kind, code = await agent.exchange(struct.pack(">IB", 32 << 20, REQUEST) + b"\0" * 16, end=False)
        report["oversized"] = {"kind": kind, "code": code}
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
