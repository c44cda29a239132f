#!/usr/bin/env python3
"""A Thrift peer on Apache Thrift's own Python library (PyPI `thrift`), for the Rust end-to-end
tests: an independent implementation of the framed/buffered transports and the binary/compact
protocols for teeway to carry and mirror, serving and calling the `Store` service in
`mirror.thrift` (next to this file).

The Python code for `Store` is generated at start with the Thrift compiler (`thrift --gen py`)
into a temporary directory, imported, and the directory removed; nothing generated is committed.

Two modes:

    peer.py serve --port P --transport framed|buffered --protocol binary|compact --log FILE
                  [--name NAME] [--host H] [--server threaded|simple]

        Serves `Store` on H:P (127.0.0.1 unless told; port 0 lets the OS choose). Prints one line,
        `listening <port>`, to stdout once the socket is bound and listening: a test waits for it
        (and reads the port from it). Every call received, oneway `log` included, is appended to
        FILE as one JSON line, flushed before the call is answered:
            {"method": "put", "args": {"key": "k", "value": "v"}}
        (arguments by their IDL names; i64 as a JSON number). The store is an in-memory dict:
        `get` answers the value or raises NotFound(key), `put` stores, `log` appends, `add`
        answers a+b. The default server takes several connections at once (a thread each);
        `--server simple` serves one connection at a time, the others waiting in the backlog.
        Exits with 0 on SIGTERM or SIGINT. NAME prefixes its diagnostics on stderr.

    peer.py call --port P --transport framed|buffered --protocol binary|compact --script FILE
                 [--host H] [--timeout SECONDS]

        Opens ONE connection and makes, in order on it, the calls in FILE (JSON lines, the shape
        of the server's log; blank lines skipped). Prints one JSON line per call to stdout as it
        completes:
            {"method": "get", "result": "v"}
            {"method": "get", "exception": "NotFound", "key": "k"}   (the declared exception)
            {"method": "put", "result": null}                         (void)
            {"method": "log", "result": null}                         (oneway: sent, no answer)
        Exit status 0 when every call completed (a declared exception is a completed call);
        1, with a message on stderr, on any transport, protocol or application error (including
        a read timeout, 10 s unless told); 2 for a script that cannot be read, names a method
        Store lacks (both checked before connecting) or gives a call arguments it cannot take.

Binary is TBinaryProtocol with strict read and write (the library's default); compact is
TCompactProtocol. Framed is TFramedTransport; buffered is TBufferedTransport.
"""

import argparse
import importlib
import json
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading

from thrift.Thrift import TApplicationException
from thrift.protocol import TBinaryProtocol, TCompactProtocol
from thrift.protocol.TProtocol import TProtocolException
from thrift.server import TServer
from thrift.transport import TSocket, TTransport

HERE = os.path.dirname(os.path.abspath(__file__))
IDL = os.path.join(HERE, "mirror.thrift")

TRANSPORTS = {
    "framed": (TTransport.TFramedTransport, TTransport.TFramedTransportFactory),
    "buffered": (TTransport.TBufferedTransport, TTransport.TBufferedTransportFactory),
}
PROTOCOLS = {
    "binary": TBinaryProtocol.TBinaryProtocolFactory,  # strict_read=True, strict_write=True
    "compact": TCompactProtocol.TCompactProtocolFactory,
}


def load_generated():
    """Generate the Python code for mirror.thrift, import it, and remove what was generated.

    Returns the modules `mirror.Store` and `mirror.ttypes`; once imported they no longer need
    their files.
    """
    compiler = shutil.which("thrift")
    if compiler is None:
        sys.exit("peer.py: the Thrift compiler (`thrift`) is not on PATH")
    with tempfile.TemporaryDirectory(prefix="teeway-thrift-") as out:
        done = subprocess.run([compiler, "--gen", "py", "-out", out, IDL],
                              capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"peer.py: thrift --gen py failed: {done.stderr.strip()}")
        sys.path.insert(0, out)
        try:
            store = importlib.import_module("mirror.Store")
            ttypes = importlib.import_module("mirror.ttypes")
        finally:
            sys.path.remove(out)
    return store, ttypes


def no_delay(sock):
    """Small request and answer frames go out at once: no Nagle delay behind an unacked write
    (a oneway call followed at once by another call would otherwise wait on a delayed ACK)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# --- serve --------------------------------------------------------------------------------------


class Recorder:
    """Appends one JSON line per call to the log file, flushed at once; safe across threads."""

    def __init__(self, path):
        self._file = open(path, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def record(self, method, **args):
        line = json.dumps({"method": method, "args": args}) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()

    def close(self):
        with self._lock:
            self._file.close()


class StoreHandler:
    """The `Store` service over an in-memory dict, recording every call before acting on it."""

    def __init__(self, ttypes, recorder):
        self._ttypes = ttypes
        self._recorder = recorder
        self._values = {}
        self._lines = []
        self._lock = threading.Lock()

    def get(self, key):
        self._recorder.record("get", key=key)
        with self._lock:
            value = self._values.get(key)
        if value is None:
            raise self._ttypes.NotFound(key=key)
        return value

    def put(self, key, value):
        self._recorder.record("put", key=key, value=value)
        with self._lock:
            self._values[key] = value

    def log(self, line):
        self._recorder.record("log", line=line)
        with self._lock:
            self._lines.append(line)

    def add(self, a, b):
        self._recorder.record("add", a=a, b=b)
        return a + b


class AnnouncingServerSocket(TSocket.TServerSocket):
    """A server socket that says `listening <port>` on stdout once it listens (the servers call
    listen() themselves, at the start of serve()) and turns Nagle off on what it accepts."""

    def listen(self):
        super().listen()
        print(f"listening {self.handle.getsockname()[1]}", flush=True)

    def accept(self):
        client = super().accept()
        no_delay(client.handle)
        return client


def serve(args):
    store, ttypes = load_generated()
    recorder = Recorder(args.log)
    processor = store.Processor(StoreHandler(ttypes, recorder))
    listener = AnnouncingServerSocket(host=args.host, port=args.port,
                                      socket_family=socket.AF_INET)
    transport_factory = TRANSPORTS[args.transport][1]()
    protocol_factory = PROTOCOLS[args.protocol]()
    if args.server == "threaded":
        # Daemon threads: connections still open do not hold the process up at exit.
        server = TServer.TThreadedServer(processor, listener, transport_factory,
                                         protocol_factory, daemon=True)
    else:
        server = TServer.TSimpleServer(processor, listener, transport_factory, protocol_factory)

    def stop(signum, _frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.serve()  # returns only by the SystemExit raised in stop()
    finally:
        listener.close()
        recorder.close()


# --- call ---------------------------------------------------------------------------------------


def read_script(path):
    """The calls in a script: [(method, args)], from JSON lines, blank lines skipped."""
    calls = []
    with open(path, encoding="utf-8") as f:
        for n, text in enumerate(f, 1):
            if not text.strip():
                continue
            entry = json.loads(text)
            if not isinstance(entry, dict) or not isinstance(entry.get("method"), str):
                raise ValueError(f"line {n}: expected {{\"method\": ..., \"args\": {{...}}}}")
            calls.append((entry["method"], entry.get("args", {})))
    return calls


def declared_fields(exc):
    """The fields of a declared (IDL) exception, by their IDL names."""
    return {spec[2]: getattr(exc, spec[2]) for spec in type(exc).thrift_spec if spec}


def call(args):
    store, ttypes = load_generated()
    declared = (ttypes.NotFound,)
    try:
        calls = read_script(args.script)
    except (OSError, ValueError) as e:
        print(f"peer.py call: script {args.script}: {e}", file=sys.stderr)
        return 2
    unknown = sorted({m for m, _ in calls if m.startswith("_") or not hasattr(store.Iface, m)})
    if unknown:
        print(f"peer.py call: script {args.script}: not methods of Store: {', '.join(unknown)}",
              file=sys.stderr)
        return 2

    sock = TSocket.TSocket(args.host, args.port, socket_family=socket.AF_INET)
    sock.setTimeout(args.timeout * 1000)
    transport = TRANSPORTS[args.transport][0](sock)
    client = store.Client(PROTOCOLS[args.protocol]().getProtocol(transport))
    what = "connect"
    try:
        transport.open()
        no_delay(sock.handle)
        for n, (method, call_args) in enumerate(calls, 1):
            what = f"call {n} ({method})"
            try:
                result = getattr(client, method)(**call_args)
                report = {"method": method, "result": result}
            except declared as e:
                report = {"method": method, "exception": type(e).__name__, **declared_fields(e)}
            print(json.dumps(report), flush=True)
    except (TypeError, struct.error) as e:  # arguments that are not the method's
        print(f"peer.py call: {what}: {e}", file=sys.stderr)
        return 2
    except (TTransport.TTransportException, TProtocolException, TApplicationException,
            OSError) as e:
        cause = getattr(e, "inner", None)  # TTransportException wraps the socket error
        detail = f"{e} ({cause!r})" if cause is not None else str(e)
        print(f"peer.py call: {what}: {type(e).__name__}: {detail}", file=sys.stderr)
        return 1
    finally:
        transport.close()
    return 0


# --- command line -------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    modes = parser.add_subparsers(dest="mode", required=True)

    def common(p):
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--transport", choices=sorted(TRANSPORTS), required=True)
        p.add_argument("--protocol", choices=sorted(PROTOCOLS), required=True)

    s = modes.add_parser("serve", help="serve Store, logging every call received")
    common(s)
    s.add_argument("--log", required=True, help="file to append one JSON line per call to")
    s.add_argument("--name", default="thrift-peer", help="prefix for diagnostics on stderr")
    s.add_argument("--server", choices=["threaded", "simple"], default="threaded",
                   help="a thread per connection (default), or one connection at a time")

    c = modes.add_parser("call", help="make the calls in a script on one connection")
    common(c)
    c.add_argument("--script", required=True, help="JSON lines: {\"method\":..., \"args\":{...}}")
    c.add_argument("--timeout", type=float, default=10.0, help="socket timeout, seconds")

    args = parser.parse_args()
    name = getattr(args, "name", "thrift-peer")
    logging.basicConfig(level=logging.WARNING, format=f"{name}: %(levelname)s %(message)s")
    if args.mode == "serve":
        serve(args)
        return 0
    return call(args)


if __name__ == "__main__":
    sys.exit(main())
