#!/usr/bin/env python3
"""A small JSON service in two versions, for tests/compare.rs: what a team compares before it
ships v2. Every answer carries a random request id and the time: noise, which two v1 instances
disagree on too.

    GET /users/<id>  {"id", "name", "price", "request_id", "at"}
                     v2's regression: the price of users with an even id is 12, not 10
    GET /health      {"status": "ok", "request_id", "at"}: the same in both versions
    POST /users/<id> as GET (the body is read and ignored)

Every answer sets a session cookie, which must never leave production.

Usage: service.py --version v1|v2 [--port 0]; prints "listening <port>" once it listens.
"""

import argparse
import datetime
import json
import sys
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--version", choices=["v1", "v2"], required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            self.do_GET()

        def do_GET(self):
            now = datetime.datetime.now(datetime.timezone.utc).isoformat()
            noise = {"request_id": str(uuid.uuid4()), "at": now}
            parts = self.path.split("?")[0].strip("/").split("/")
            if parts == ["health"]:
                self.answer(200, {"status": "ok", **noise})
            elif len(parts) == 2 and parts[0] == "users" and parts[1].isdigit():
                user = int(parts[1])
                price = 12 if args.version == "v2" and user % 2 == 0 else 10
                self.answer(200, {"id": user, "name": f"user{user}", "price": price, **noise})
            else:
                self.answer(404, {"error": "not found"})

        def answer(self, status, document):
            body = json.dumps(document).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Set-Cookie", f"session={uuid.uuid4()}; HttpOnly")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"listening {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
