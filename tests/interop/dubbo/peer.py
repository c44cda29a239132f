#!/usr/bin/env python3
"""A Dubbo 2 peer for the Rust end-to-end tests: the consumer is a Dubbo client from PyPI
(`dubbo-ssl-python`, an implementation of the Dubbo 2 wire protocol and Hessian2 independent of
teeway's), the provider is written here on raw sockets with a small Hessian2 codec of its own.
Both speak the `dubbo` protocol of Dubbo 2.x: a 16-byte header (magic 0xdabb, flag, status,
request id, body length) and a Hessian2 body; the service is the Dubbo samples' (and Aeraki's)
`org.apache.dubbo.samples.basic.api.DemoService`.

Two modes:

    peer.py serve --port P --log FILE [--version V] [--name NAME] [--host H]

        Serves DemoService on H:P (127.0.0.1 unless told; port 0 lets the OS choose). Prints one
        line, `listening <port>`, to stdout once the socket listens: a test waits for it (and
        reads the port from it). Several connections at once, a thread each; the requests of one
        connection are answered in order. Methods:
            sayHello(String name)   -> "Hello <name>, response from provider: <V>"
            sayGoodbye(String name) -> "Goodbye <name>, response from provider: <V>"
            fail(String name)       -> throws java.lang.RuntimeException with the message
                                       "Failed <name>, response from provider: <V>"
        (V is --version, `v1` unless told: it tells a primary's answers from a shadow's.) Every
        request that is not an event (heartbeat) is appended to FILE as one JSON line, flushed
        before it is answered, one-way requests included:
            {"service": "org.apache.dubbo.samples.basic.api.DemoService", "version": "1.0.0",
             "method": "sayHello", "args": ["world"], "attachments": {"user": "u1", ...}, "id": 7}
        ("service" is the body's service path, "version" its service version, "id" the header's
        request id; Hessian2 longs and ints are JSON numbers, objects are JSON objects with their
        class in "$class", binary is hex.) Answers, as a Java provider on Dubbo 2.7 does:
          - a two-way request: a response with the same id, flag 0x02 (Hessian2), status 20 OK,
            and a body of the response type (a Hessian2 int: 1 value, 2 null, 0 exception; 4, 5
            and 3, followed by a map of response attachments {"dubbo": "2.0.2"}, when the
            request's dubbo version is 2.0.2 to 2.0.99) then the value or the exception object
            (java.lang.RuntimeException, its fields detailMessage, cause, stackTrace and
            suppressedExceptions, as Hessian2's Java serializer writes them);
          - an unknown service or method, or a method given arguments it does not take:
            status 70 SERVICE_ERROR, the body a Hessian2 string saying so;
          - a body that does not decode, or a serialization other than Hessian2 (id 2):
            status 40 BAD_REQUEST, the body a Hessian2 string;
          - a two-way event (heartbeat): a heartbeat response, flag 0x22, status 20, body `N`;
          - a one-way request or event: nothing.
        A frame without the magic, or announcing a body over 8 MiB (Dubbo's default payload
        limit), closes its connection. Exits with 0 on SIGTERM or SIGINT. NAME prefixes its
        diagnostics on stderr.

    peer.py call --port P --script FILE [--host H] [--timeout SECONDS]
                 [--service S] [--service-version V] [--group G] [--dubbo-version D]

        Opens ONE connection with dubbo-ssl-python's client (direct, no registry) and makes, in
        order on it, the calls in FILE (JSON lines, blank lines skipped):
            {"method": "sayHello", "args": ["world"], "attachments": {"user": "u1"}}
            {"method": "sayHello", "args": ["x"], "oneway": true}   (sent one-way: no answer)
            {"heartbeat": true}                      (a heartbeat event, its response awaited)
        "args" (a list of strings, ints, floats, booleans, or non-empty lists of one of those:
        the library has no descriptor for null) and "attachments" (an object of strings,
        numbers, booleans) may be left out; "service" and "version" override the options for
        one call. The library derives the parameter-type descriptor from the Python values
        (str -> Ljava/lang/String;, int -> I or J, bool -> Z, float -> D) and always sends the
        attachments path, interface, version and group (null unless --group) before the
        script's. Prints one JSON line per call to stdout as it completes:
            {"method": "sayHello", "result": "Hello world, response from provider: v1"}
            {"method": "fail", "exception": "java.lang.RuntimeException",
             "message": "Failed x, response from provider: v1"}        (an application exception)
            {"method": "sayHello", "result": null}                       (one-way: sent)
            {"heartbeat": true}                                          (its response came)
        Exit status 0 when every call completed (an application exception is a completed call);
        1, with a message on stderr, on a transport or protocol error, a response status other
        than 20 OK, or a read timeout (10 s unless told); 2 for a script that cannot be read or
        gives a call arguments the library cannot encode.

        Defaults: --service org.apache.dubbo.samples.basic.api.DemoService, --service-version
        1.0.0, --dubbo-version 2.0.2 (what Dubbo 2.6 and 2.7 consumers send; a provider then
        answers with response attachments). dubbo-ssl-python numbers its requests 0, 1, 2...
        (heartbeats included). Two gaps of the library are filled here, without touching its
        encoding: its response parser knows only the response types 0, 1 and 2 (not 3, 4 and 5,
        with attachments), and a connection the remote closes leaves a call waiting for its
        timeout; here those types are read too, and a close fails the waiting call at once.
        Limits of the library that remain: it misreads (silently) a string answer of more than
        32767 UTF-16 units (Java's chunked `R` form, and `S` lengths of 0x8000 and over), so
        keep a test's names well under that; it cannot send a string of more than 65535
        characters, nor characters outside the BMP; a response with an empty body (length 0)
        makes it drop the connection as if closed; it connects with a 0.5 s pause.
"""

import argparse
import json
import logging
import signal
import socket
import struct
import sys
import threading
import time

SERVICE = "org.apache.dubbo.samples.basic.api.DemoService"
IMPL = "org.apache.dubbo.samples.basic.impl.DemoServiceImpl"

MAGIC = 0xDABB
HEADER = struct.Struct(">HBBqi")  # magic, flag, status, request id, body length
FLAG_REQUEST, FLAG_TWOWAY, FLAG_EVENT = 0x80, 0x40, 0x20
SERIALIZATION_MASK, HESSIAN2 = 0x1F, 2
OK, BAD_REQUEST, SERVICE_ERROR = 20, 40, 70
MAX_PAYLOAD = 8 * 1024 * 1024  # Dubbo's default `payload`

# The response types (the first value of an OK response's body).
RESPONSE_WITH_EXCEPTION, RESPONSE_VALUE, RESPONSE_NULL_VALUE = 0, 1, 2
WITH_ATTACHMENTS = 3  # added to the three above when the response carries attachments
PROTOCOL_VERSION = "2.0.2"


def no_delay(sock):
    """Small request and answer frames go out at once: no Nagle delay behind an unacked write
    (a one-way call followed at once by another call would otherwise wait on a delayed ACK)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# --- Hessian2 -----------------------------------------------------------------------------------
# Enough of http://hessian.caucho.com/doc/hessian-serialization.html for Dubbo bodies: every
# value type on reading (strings and binary in chunks, compact ints and longs, doubles, dates,
# maps typed and untyped, lists of all four kinds, class definitions and objects, references);
# null, booleans, ints, longs, doubles, strings, binary, lists, maps and objects on writing.
# Strings count UTF-16 code units and carry surrogates as 3-byte sequences, as Java writes them.


class HessianError(ValueError):
    pass


class JavaObject:
    """An object to write: its class name and its fields, in order."""

    def __init__(self, cls, fields):
        self.cls, self.fields = cls, fields


class TypedList:
    """A list to write with its Java type (e.g. `[java.lang.StackTraceElement`)."""

    def __init__(self, type_name, items):
        self.type_name, self.items = type_name, items


class Ref:
    """A reference to the n-th map, list or object written before (Hessian2 `Q`)."""

    def __init__(self, n):
        self.n = n


class Hessian2Reader:
    def __init__(self, data):
        self._data = bytes(data)
        self._pos = 0
        self._refs = []
        self._classes = []
        self._types = []

    def at_end(self):
        return self._pos >= len(self._data)

    def _byte(self):
        if self._pos >= len(self._data):
            raise HessianError("body ends inside a value")
        b = self._data[self._pos]
        self._pos += 1
        return b

    def _take(self, n):
        if self._pos + n > len(self._data):
            raise HessianError("body ends inside a value")
        chunk = self._data[self._pos:self._pos + n]
        self._pos += n
        return chunk

    def _peek(self):
        if self._pos >= len(self._data):
            raise HessianError("body ends inside a value")
        return self._data[self._pos]

    def _u16(self):
        return struct.unpack(">H", self._take(2))[0]

    def read(self):
        code = self._byte()
        if code <= 0x1F or 0x30 <= code <= 0x33 or code in (0x52, 0x53):
            return self._string(code)
        if 0x20 <= code <= 0x2F or 0x34 <= code <= 0x37 or code in (0x41, 0x42):
            return self._binary(code)
        if 0x80 <= code <= 0xBF:
            return code - 0x90
        if 0xC0 <= code <= 0xCF:
            return ((code - 0xC8) << 8) | self._byte()
        if 0xD0 <= code <= 0xD7:
            return ((code - 0xD4) << 16) | (self._byte() << 8) | self._byte()
        if code == 0x49:  # I
            return struct.unpack(">i", self._take(4))[0]
        if 0xD8 <= code <= 0xEF:
            return code - 0xE0
        if 0xF0 <= code <= 0xFF:
            return ((code - 0xF8) << 8) | self._byte()
        if 0x38 <= code <= 0x3F:
            return ((code - 0x3C) << 16) | (self._byte() << 8) | self._byte()
        if code == 0x59:  # long as 32 bits
            return struct.unpack(">i", self._take(4))[0]
        if code == 0x4C:  # L
            return struct.unpack(">q", self._take(8))[0]
        if code == 0x44:  # D
            return struct.unpack(">d", self._take(8))[0]
        if code == 0x5B:
            return 0.0
        if code == 0x5C:
            return 1.0
        if code == 0x5D:
            return float(struct.unpack(">b", self._take(1))[0])
        if code == 0x5E:
            return float(struct.unpack(">h", self._take(2))[0])
        if code == 0x5F:
            return struct.unpack(">i", self._take(4))[0] / 1000.0
        if code == 0x4E:  # N
            return None
        if code == 0x54:  # T
            return True
        if code == 0x46:  # F
            return False
        if code == 0x4A:  # date, milliseconds
            return struct.unpack(">q", self._take(8))[0]
        if code == 0x4B:  # date, minutes
            return struct.unpack(">i", self._take(4))[0] * 60000
        if code == 0x48:  # H: untyped map
            return self._map()
        if code == 0x4D:  # M: typed map
            self._type()
            return self._map()
        if code == 0x55:  # U: typed, variable length
            self._type()
            return self._list(None)
        if code == 0x56:  # V: typed, fixed length
            self._type()
            return self._list(self._int())
        if code == 0x57:  # W: untyped, variable length
            return self._list(None)
        if code == 0x58:  # X: untyped, fixed length
            return self._list(self._int())
        if 0x70 <= code <= 0x77:
            self._type()
            return self._list(code - 0x70)
        if 0x78 <= code <= 0x7F:
            return self._list(code - 0x78)
        if code == 0x43:  # C: class definition, then (at least) the object it is for
            name = self.read()
            if not isinstance(name, str):
                raise HessianError("class definition without a name")
            fields = [self.read() for _ in range(self._int())]
            self._classes.append((name, fields))
            return self.read()
        if code == 0x4F:  # O
            return self._object(self._int())
        if 0x60 <= code <= 0x6F:
            return self._object(code - 0x60)
        if code == 0x51:  # Q: reference
            n = self._int()
            if not 0 <= n < len(self._refs):
                raise HessianError(f"reference {n} to nothing")
            return self._refs[n]
        raise HessianError(f"unexpected byte 0x{code:02x}")

    def _int(self):
        value = self.read()
        if not isinstance(value, int) or isinstance(value, bool):
            raise HessianError(f"expected an int, found {value!r}")
        return value

    def _type(self):
        t = self.read()
        if isinstance(t, str):
            self._types.append(t)
            return t
        if isinstance(t, int) and 0 <= t < len(self._types):
            return self._types[t]
        raise HessianError(f"bad type {t!r}")

    def _string(self, code):
        units = []
        while True:
            if code == 0x52:  # R: a chunk, more follow
                self._utf16(self._u16(), units)
                code = self._byte()
                continue
            if code == 0x53:
                n = self._u16()
            elif code <= 0x1F:
                n = code
            elif 0x30 <= code <= 0x33:
                n = ((code - 0x30) << 8) | self._byte()
            else:
                raise HessianError(f"0x{code:02x} inside a string")
            self._utf16(n, units)
            break
        raw = b"".join(struct.pack(">H", u) for u in units)
        return raw.decode("utf-16-be", "surrogatepass")

    def _utf16(self, n, units):
        """Reads n UTF-16 code units written as (modified) UTF-8."""
        while n > 0:
            b = self._byte()
            if b < 0x80:
                units.append(b)
            elif 0xC0 <= b < 0xE0:
                units.append(((b & 0x1F) << 6) | (self._byte() & 0x3F))
            elif 0xE0 <= b < 0xF0:
                units.append(((b & 0x0F) << 12) | ((self._byte() & 0x3F) << 6)
                             | (self._byte() & 0x3F))
            elif 0xF0 <= b < 0xF8:  # 4-byte UTF-8 (not Java's, but seen): two code units
                cp = (((b & 0x07) << 18) | ((self._byte() & 0x3F) << 12)
                      | ((self._byte() & 0x3F) << 6) | (self._byte() & 0x3F)) - 0x10000
                units += [0xD800 | (cp >> 10), 0xDC00 | (cp & 0x3FF)]
                n -= 1
            else:
                raise HessianError(f"bad UTF-8 byte 0x{b:02x} in a string")
            n -= 1

    def _binary(self, code):
        parts = []
        while True:
            if code == 0x41:  # A: a chunk, more follow
                parts.append(self._take(self._u16()))
                code = self._byte()
                continue
            if code == 0x42:
                parts.append(self._take(self._u16()))
            elif 0x20 <= code <= 0x2F:
                parts.append(self._take(code - 0x20))
            elif 0x34 <= code <= 0x37:
                parts.append(self._take(((code - 0x34) << 8) | self._byte()))
            else:
                raise HessianError(f"0x{code:02x} inside binary data")
            return b"".join(parts)

    def _map(self):
        result = {}
        self._refs.append(result)
        while self._peek() != 0x5A:
            key = self.read()
            if isinstance(key, (dict, list)):
                key = json.dumps(key, default=str, sort_keys=True)
            result[key] = self.read()
        self._pos += 1
        return result

    def _list(self, length):
        result = []
        self._refs.append(result)
        if length is None:
            while self._peek() != 0x5A:
                result.append(self.read())
            self._pos += 1
        else:
            for _ in range(length):
                result.append(self.read())
        return result

    def _object(self, n):
        if not 0 <= n < len(self._classes):
            raise HessianError(f"object of undefined class {n}")
        name, fields = self._classes[n]
        result = {"$class": name}
        self._refs.append(result)
        for field in fields:
            result[field] = self.read()
        return result


class Hessian2Writer:
    def __init__(self):
        self._out = bytearray()
        self._classes = []

    def getvalue(self):
        return bytes(self._out)

    def write(self, value):
        out = self._out
        if value is None:
            out += b"N"
        elif isinstance(value, bool):
            out += b"T" if value else b"F"
        elif isinstance(value, int):
            self._int(value)
        elif isinstance(value, float):
            out += b"D" + struct.pack(">d", value)
        elif isinstance(value, str):
            self._string(value)
        elif isinstance(value, (bytes, bytearray)):
            self._binary(bytes(value))
        elif isinstance(value, Ref):
            out.append(0x51)
            self._int(value.n)
        elif isinstance(value, TypedList):
            n = len(value.items)
            if n <= 7:
                out.append(0x70 + n)
                self._string(value.type_name)
            else:
                out.append(0x56)
                self._string(value.type_name)
                self._int(n)
            for item in value.items:
                self.write(item)
        elif isinstance(value, (list, tuple)):
            if len(value) <= 7:
                out.append(0x78 + len(value))
            else:
                out.append(0x58)
                self._int(len(value))
            for item in value:
                self.write(item)
        elif isinstance(value, dict):
            out += b"H"
            for k, v in value.items():
                self.write(k)
                self.write(v)
            out += b"Z"
        elif isinstance(value, JavaObject):
            names = [name for name, _ in value.fields]
            key = (value.cls, tuple(names))
            if key not in self._classes:
                out += b"C"
                self._string(value.cls)
                self._int(len(names))
                for name in names:
                    self._string(name)
                self._classes.append(key)
            n = self._classes.index(key)
            if n <= 0xF:
                out.append(0x60 + n)
            else:
                out += b"O"
                self._int(n)
            for _, field in value.fields:
                self.write(field)
        else:
            raise HessianError(f"cannot write {type(value).__name__}")

    def _int(self, v):
        out = self._out
        if -0x10 <= v <= 0x2F:
            out.append(0x90 + v)
        elif -0x800 <= v <= 0x7FF:
            out += bytes([0xC8 + (v >> 8), v & 0xFF])
        elif -0x40000 <= v <= 0x3FFFF:
            out += bytes([0xD4 + (v >> 16), (v >> 8) & 0xFF, v & 0xFF])
        elif -0x80000000 <= v <= 0x7FFFFFFF:
            out += b"I" + struct.pack(">i", v)
        else:
            out += b"L" + struct.pack(">q", v)

    def _string(self, s):
        raw = s.encode("utf-16-be", "surrogatepass")
        units = struct.unpack(f">{len(raw) // 2}H", raw)
        while len(units) > 0x8000:  # Java's chunks: 'R', 32768 units, not ending mid-pair
            n = 0x8000
            if 0xD800 <= units[n - 1] < 0xDC00:
                n -= 1
            self._out += b"R" + struct.pack(">H", n)
            self._utf8(units[:n])
            units = units[n:]
        n = len(units)
        if n <= 0x1F:
            self._out.append(n)
        elif n <= 0x3FF:
            self._out += bytes([0x30 + (n >> 8), n & 0xFF])
        else:
            self._out += b"S" + struct.pack(">H", n)
        self._utf8(units)

    def _utf8(self, units):
        out = self._out
        for u in units:
            if u < 0x80:
                out.append(u)
            elif u < 0x800:
                out += bytes([0xC0 | (u >> 6), 0x80 | (u & 0x3F)])
            else:
                out += bytes([0xE0 | (u >> 12), 0x80 | ((u >> 6) & 0x3F), 0x80 | (u & 0x3F)])

    def _binary(self, data):
        while len(data) > 0x8000:
            self._out += b"A" + struct.pack(">H", 0x8000) + data[:0x8000]
            data = data[0x8000:]
        if len(data) <= 0xF:
            self._out.append(0x20 + len(data))
        elif len(data) <= 0x3FF:
            self._out += bytes([0x34 + (len(data) >> 8), len(data) & 0xFF])
        else:
            self._out += b"B" + struct.pack(">H", len(data))
        self._out += data


def hessian2(*values):
    w = Hessian2Writer()
    for v in values:
        w.write(v)
    return w.getvalue()


# --- serve --------------------------------------------------------------------------------------


class Recorder:
    """Appends one JSON line per request to the log file, flushed at once; safe across threads."""

    def __init__(self, path):
        self._file = open(path, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def record(self, entry):
        line = json.dumps(entry, default=lambda o: o.hex() if isinstance(o, bytes) else str(o))
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self):
        with self._lock:
            self._file.close()


def parameter_count(desc):
    """How many parameters a JVM parameter-type descriptor names (`Ljava/lang/String;I` -> 2)."""
    n = i = 0
    while i < len(desc):
        while i < len(desc) and desc[i] == "[":
            i += 1
        if i < len(desc) and desc[i] == "L":
            end = desc.find(";", i)
            if end < 0:
                raise HessianError(f"bad parameter types {desc!r}")
            i = end + 1
        elif i < len(desc) and desc[i] in "VZBCDFIJS":
            i += 1
        else:
            raise HessianError(f"bad parameter types {desc!r}")
        n += 1
    return n


def decode_request(body):
    """A request body: dubbo version, service path, service version, method, parameter types,
    the arguments, the attachments map (absent or null read as empty)."""
    r = Hessian2Reader(body)
    dubbo_version, path, version, method, desc = (r.read() for _ in range(5))
    if not isinstance(path, str) or not isinstance(method, str):
        raise HessianError("no service path or method name")
    if desc is None:
        desc = ""
    if not isinstance(desc, str):
        raise HessianError(f"parameter types {desc!r} are not a string")
    args = [r.read() for _ in range(parameter_count(desc))]
    attachments = {} if r.at_end() else r.read()
    if attachments is None:
        attachments = {}
    if not isinstance(attachments, dict):
        raise HessianError(f"attachments {attachments!r} are not a map")
    return {"dubbo": dubbo_version, "service": path, "version": version, "method": method,
            "types": desc, "args": args, "attachments": attachments}


def int_version(version):
    """Dubbo's Version.getIntVersion: "2.0.2" -> 2000200, "2.6.3" -> 2060300."""
    parts = version.split(".")
    if not parts or not all(p.isdigit() for p in parts):
        return 0
    v = 0
    for p in parts:
        v = v * 100 + int(p)
    return v * 100 if len(parts) == 3 else v


def with_response_attachments(dubbo_version):
    """Dubbo's Version.isSupportResponseAttachment: requests from 2.0.2 to 2.0.99."""
    return isinstance(dubbo_version, str) and 2000200 <= int_version(dubbo_version) <= 2009900


def exception_object(message, method):
    """A java.lang.RuntimeException as Hessian2's Java serializer writes it: its own fields
    (none), then Throwable's non-transient ones; `cause` is the exception itself (a reference
    to it, Throwable's `cause = this`); one stack frame, in Java 8's StackTraceElement layout."""
    frame = JavaObject("java.lang.StackTraceElement", [
        ("declaringClass", IMPL), ("methodName", method),
        ("fileName", "DemoServiceImpl.java"), ("lineNumber", 42)])
    return JavaObject("java.lang.RuntimeException", [
        ("detailMessage", message),
        ("cause", Ref(0)),
        ("stackTrace", TypedList("[java.lang.StackTraceElement", [frame])),
        ("suppressedExceptions",
         TypedList("java.util.Collections$UnmodifiableRandomAccessList", []))])


def invoke(request, label):
    """(status, body) for a decoded request to DemoService."""
    if request["service"] != SERVICE:
        return SERVICE_ERROR, hessian2(
            f"Not found exported service: {request['service']}:{request['version']}; "
            f"this provider exports {SERVICE}")
    method, args = request["method"], request["args"]
    if method not in ("sayHello", "sayGoodbye", "fail") or len(args) != 1:
        return SERVICE_ERROR, hessian2(
            f"java.lang.NoSuchMethodException: {SERVICE}.{method}({request['types']})")
    name = args[0]
    attach = with_response_attachments(request["dubbo"])
    plus = WITH_ATTACHMENTS if attach else 0
    if method == "fail":
        message = f"Failed {name}, response from provider: {label}"
        values = [RESPONSE_WITH_EXCEPTION + plus, exception_object(message, method)]
    else:
        word = "Hello" if method == "sayHello" else "Goodbye"
        values = [RESPONSE_VALUE + plus, f"{word} {name}, response from provider: {label}"]
    if attach:
        values.append({"dubbo": PROTOCOL_VERSION})
    return OK, hessian2(*values)


def frame(flag, status, request_id, body):
    return HEADER.pack(MAGIC, flag, status, request_id, len(body)) + body


def recv_exact(sock, n):
    """n bytes, or None at the end of the stream before any; an error at an end inside."""
    parts, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 16))
        if not chunk:
            if got == 0:
                return None
            raise ConnectionError(f"stream ends inside a frame ({got} of {n} bytes)")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def serve_connection(conn, peer, recorder, label):
    log = logging.getLogger("serve")
    try:
        while True:
            head = recv_exact(conn, HEADER.size)
            if head is None:
                return
            magic, flag, _status, request_id, length = HEADER.unpack(head)
            if magic != MAGIC:
                log.warning("%s: not a Dubbo frame (0x%04x), closing", peer, magic)
                return
            if not 0 <= length <= MAX_PAYLOAD:
                log.warning("%s: body of %d bytes, closing", peer, length)
                return
            body = recv_exact(conn, length) if length else b""
            if body is None:
                raise ConnectionError("stream ends after a header")
            if not flag & FLAG_REQUEST:
                continue  # a response: this provider asks nothing, so nothing to match
            two_way = bool(flag & FLAG_TWOWAY)
            if flag & FLAG_EVENT:
                if two_way:  # a heartbeat; one-way events (readonly) are not answered
                    conn.sendall(frame(FLAG_EVENT | HESSIAN2, OK, request_id, b"N"))
                continue
            if flag & SERIALIZATION_MASK != HESSIAN2:
                log.warning("%s: request %d in serialization %d", peer, request_id,
                            flag & SERIALIZATION_MASK)
                if two_way:
                    conn.sendall(frame(HESSIAN2, BAD_REQUEST, request_id, hessian2(
                        f"serialization {flag & SERIALIZATION_MASK} unsupported, only hessian2")))
                continue
            try:
                request = decode_request(body)
            except HessianError as e:
                log.warning("%s: request %d: %s", peer, request_id, e)
                if two_way:
                    conn.sendall(frame(HESSIAN2, BAD_REQUEST, request_id,
                                       hessian2(f"Fail to decode request: {e}")))
                continue
            recorder.record({"service": request["service"], "version": request["version"],
                             "method": request["method"], "args": request["args"],
                             "attachments": request["attachments"], "id": request_id})
            if two_way:
                status, payload = invoke(request, label)
                conn.sendall(frame(HESSIAN2, status, request_id, payload))
    except OSError as e:
        log.warning("%s: %s", peer, e)
    finally:
        conn.close()


def serve(args):
    recorder = Recorder(args.log)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((args.host, args.port))
    listener.listen(128)
    print(f"listening {listener.getsockname()[1]}", flush=True)

    def stop(signum, _frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while True:
            conn, addr = listener.accept()
            no_delay(conn)
            # Daemon threads: connections still open do not hold the process up at exit.
            threading.Thread(target=serve_connection, daemon=True,
                             args=(conn, f"{addr[0]}:{addr[1]}", recorder, args.version)).start()
    finally:
        listener.close()
        recorder.close()


# --- call ---------------------------------------------------------------------------------------


def read_script(path):
    """The calls in a script, as dicts, from JSON lines, blank lines skipped; checked."""
    calls = []
    with open(path, encoding="utf-8") as f:
        for n, text in enumerate(f, 1):
            if not text.strip():
                continue
            entry = json.loads(text)
            if isinstance(entry, dict) and entry.get("heartbeat") is True:
                calls.append(entry)
                continue
            if not isinstance(entry, dict) or not isinstance(entry.get("method"), str):
                raise ValueError(f"line {n}: expected {{\"method\": ..., \"args\": [...]}}"
                                 " or {\"heartbeat\": true}")
            if not isinstance(entry.setdefault("args", []), list):
                raise ValueError(f"line {n}: \"args\" is not a list")
            if not isinstance(entry.setdefault("attachments", {}), dict):
                raise ValueError(f"line {n}: \"attachments\" is not an object")
            for key in ("service", "version"):
                if not isinstance(entry.get(key, ""), str):
                    raise ValueError(f"line {n}: \"{key}\" is not a string")
            calls.append(entry)
    return calls


class ApplicationException(Exception):
    """An exception the provider's method threw (response type 0 or 3)."""

    def __init__(self, cls, message):
        super().__init__(f"{cls}: {message}")
        self.cls, self.message = cls, message


class ConnectionClosed(Exception):
    pass


def adapt_library(pool_class, response_class):
    """Fill two gaps of dubbo-ssl-python's connection pool (see the module's doc): read the
    response types with attachments too, and fail waiting calls when the connection closes.
    Hessian decoding stays the library's (its Response)."""

    def parse_response(self, invoke_id, body):
        if invoke_id is None:  # a heartbeat's body
            return
        try:
            res = response_class(body)
            kind = res.read_int()
            if kind in (RESPONSE_NULL_VALUE, RESPONSE_NULL_VALUE + WITH_ATTACHMENTS):
                result = None
            elif kind in (RESPONSE_VALUE, RESPONSE_VALUE + WITH_ATTACHMENTS):
                result = res.read_next()
            elif kind in (RESPONSE_WITH_EXCEPTION, RESPONSE_WITH_EXCEPTION + WITH_ATTACHMENTS):
                error = res.read_error()  # a class definition and the exception object
                result = ApplicationException(error.get("cause"), error.get("detailMessage"))
            else:
                result = ValueError(f"unknown response type {kind}")
        except Exception as e:  # a body the library cannot decode
            result = e
        self.results[invoke_id] = result
        event = self.conn_events.get(invoke_id)
        if event is not None:
            event.set()

    delete_connection = pool_class._delete_connection

    def delete_and_fail_waiting(self, conn):
        delete_connection(self, conn)
        for invoke_id, event in list(self.conn_events.items()):
            self.results.setdefault(invoke_id, ConnectionClosed("connection closed by remote"))
            event.set()

    pool_class._parse_response = parse_response
    pool_class._delete_connection = delete_and_fail_waiting


class QuietGet(logging.Filter):
    """The pool logs every exception result (with a traceback) as it hands it to the caller,
    who reports it here anyway: drop those."""

    def filter(self, record):
        return record.funcName != "get"


def call(args):
    try:
        calls = read_script(args.script)
    except (OSError, ValueError) as e:
        print(f"peer.py call: script {args.script}: {e}", file=sys.stderr)
        return 2
    try:
        from dubbo_ssl.client import DubboClient
        from dubbo_ssl.codec.decoder import Response
        from dubbo_ssl.codec.encoder import Request
        from dubbo_ssl.common.constants import CLI_HEARTBEAT_REQ_HEAD, CLI_HEARTBEAT_TAIL
        from dubbo_ssl.common.exceptions import (DubboException, DubboRequestTimeoutException,
                                                 HessianTypeError)
        from dubbo_ssl.common.util import get_invoke_id
        from dubbo_ssl.connection import connections
    except ImportError as e:
        print(f"peer.py call: {e} (pip install dubbo-ssl-python==0.9.6)", file=sys.stderr)
        return 1
    library_log = logging.getLogger("dubbo_ssl")
    library_log.addFilter(QuietGet())
    pool = connections.connection_pool
    adapt_library(type(pool), Response)

    host = f"{args.host}:{args.port}"
    what = "connect"
    conn = None
    try:
        conn = pool._get_connection(host, None)  # plain TCP (verify=None), the one connection
        no_delay(conn._Connection__sock)
        pool.client_heartbeats[host] = 0  # the library's idle heartbeats expect the entry
        for n, entry in enumerate(calls, 1):
            if pool._connection_pool.get(host) is not conn:
                raise ConnectionClosed("connection closed by remote")
            if entry.get("heartbeat") is True:
                what = f"call {n} (heartbeat)"
                pool.client_heartbeats[host] = 1  # the library counts it down on the response
                request_id = struct.pack("!q", get_invoke_id())
                conn.write(bytearray(CLI_HEARTBEAT_REQ_HEAD + list(request_id)
                                     + CLI_HEARTBEAT_TAIL))
                deadline = time.monotonic() + args.timeout
                while pool.client_heartbeats.get(host, 0) > 0:
                    if pool._connection_pool.get(host) is not conn:
                        raise ConnectionClosed("connection closed by remote")
                    if time.monotonic() > deadline:
                        raise DubboRequestTimeoutException("no heartbeat response")
                    time.sleep(0.002)
                print(json.dumps({"heartbeat": True}), flush=True)
                continue
            method = entry["method"]
            what = f"call {n} ({method})"
            service = entry.get("service", args.service)
            version = entry.get("version", args.service_version)
            if entry.get("oneway") is True:
                # The library only makes two-way calls: its own encoding, the two-way bit off.
                data = Request({"dubbo_version": args.dubbo_version, "version": version,
                                "method": method, "path": service, "arguments": entry["args"],
                                "group": args.group, "context": entry["attachments"]}).encode()
                data[2] &= ~FLAG_TWOWAY & 0xFF
                conn.write(data)
                report = {"method": method, "result": None}
            else:
                client = DubboClient(interface=service, group=args.group, version=version,
                                     dubbo_version=args.dubbo_version, host=host)
                try:
                    result = client.call(method, args=entry["args"],
                                         context=entry["attachments"], timeout=args.timeout)
                    report = {"method": method, "result": result}
                except ApplicationException as e:
                    report = {"method": method, "exception": e.cls, "message": e.message}
            print(json.dumps(report, default=str), flush=True)
    except HessianTypeError as e:  # arguments the library cannot encode
        print(f"peer.py call: {what}: {e}", file=sys.stderr)
        return 2
    except (DubboException, ConnectionClosed, OSError, ValueError) as e:
        detail = str(e).strip().replace("\n", " ")
        print(f"peer.py call: {what}: {type(e).__name__}: {detail}", file=sys.stderr)
        return 1
    finally:
        library_log.setLevel(logging.CRITICAL)  # its reader thread, about the closing
        if conn is not None:
            pool._connection_pool.pop(host, None)
            conn.close()
    return 0


# --- command line -------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    modes = parser.add_subparsers(dest="mode", required=True)

    s = modes.add_parser("serve", help="serve DemoService, logging every request received")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--log", required=True, help="file to append one JSON line per request to")
    s.add_argument("--version", default="v1", help="named in every answer (primary, shadow)")
    s.add_argument("--name", default="dubbo-peer", help="prefix for diagnostics on stderr")

    c = modes.add_parser("call", help="make the calls in a script on one connection")
    c.add_argument("--host", default="127.0.0.1")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--script", required=True,
                   help="JSON lines: {\"method\":..., \"args\":[...], \"attachments\":{...}}")
    c.add_argument("--timeout", type=float, default=10.0, help="answer timeout, seconds")
    c.add_argument("--service", default=SERVICE, help="the interface called")
    c.add_argument("--service-version", default="1.0.0")
    c.add_argument("--group", default=None, help="sent as the `group` attachment (else null)")
    c.add_argument("--dubbo-version", default=PROTOCOL_VERSION,
                   help="the body's dubbo protocol version")

    args = parser.parse_args()
    name = getattr(args, "name", "dubbo-peer")
    logging.basicConfig(level=logging.WARNING, format=f"{name}: %(levelname)s %(message)s")
    if args.mode == "serve":
        serve(args)
        return 0
    return call(args)


if __name__ == "__main__":
    sys.exit(main())
