#!/usr/bin/env python3
"""teeway vs nginx `mirror`, side by side on one machine. Run through run.sh.

Every scenario starts its own processes on loopback ports picked here, drives them with wrk (or
h2load for HTTP/2) for a fixed time, measures throughput, latency, CPU seconds per 1,000 requests
and peak RSS of every server process, and for mirroring scenarios how many requests reached the
shadow. Upstreams are nginx `return` blocks (and `echo_sleep` for the 200 ms shadow), the same for
both tools, so neither is measured against a slow upstream. Standard library only.
"""

import argparse
import csv
import datetime
import json
import os
import platform
import re
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import types
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TEEWAY = os.environ.get("TEEWAY_BIN", os.path.join(ROOT, "target", "release", "teeway"))
RELAY = os.environ.get("TEEWAY_RELAY_BIN", os.path.join(ROOT, "target", "release", "examples", "wan_relay"))
RPC_PEER = os.environ.get("TEEWAY_RPC_PEER_BIN", os.path.join(ROOT, "target", "release", "examples", "rpc_peer"))
ECHO_MODULE = "/usr/lib/nginx/modules/ngx_http_echo_module.so"
STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"
CLK_TCK = os.sysconf("SC_CLK_TCK")
WAIT_LIMIT = 30.0  # seconds: upper bound on any readiness or drain wait
# The production side (the clients, the proxy or agent, the primary behind it) runs on one core;
# the test side (gateway, shadows, the WAN relay) on the other, so mirroring work cannot slow
# production down by taking its core, nor by taking the clients' (which would lower the offered
# load and pass for a cost of mirroring).
PRODUCTION_CPU, TEST_CPU = 0, 1
LOAD_CPU = PRODUCTION_CPU
# The slowloris attacker is not production's load: a proxy that closes idle connections at its
# cap (teeway) makes it reconnect in a loop, and on the production core that loop would take the
# proxy's CPU, measuring the attacker rather than the proxy (a real attacker has its own machine).
ATTACK_CPU = TEST_CPU
PRODUCTION_SIDE = ("primary", "grpc-primary", "h2-primary", "proxy", "agent", "redis-primary", "rpc-primary")


def pin(cpu):
    """A preexec_fn pinning the child to `cpu` (where the machine has more than one core)."""
    if (os.cpu_count() or 1) < 2:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def cpu_for(name):
    return PRODUCTION_CPU if name in PRODUCTION_SIDE else TEST_CPU

WRK_REPORT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH requests=%d duration_us=%d errors=%d p50_us=%d p99_us=%d p999_us=%d\\n",
    summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
"""

# The WAN scenarios' requests: POSTs of 1 KiB, so a copy is about 1.2 KiB on the link.
WRK_POST_1K = """
wrk.method = "POST"
wrk.body = string.rep("x", 1024)
wrk.headers["Content-Type"] = "application/octet-stream"
"""


def free_port(kind=socket.SOCK_STREAM):
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_udp_and_tcp_port():
    """A port free for both UDP and TCP: the gateway serves QUIC and TLS on the same number (a
    UDP-only pick once collided with a TCP socket and the gateway could not start)."""
    for _ in range(50):
        port = free_port(socket.SOCK_DGRAM)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no port free for both UDP and TCP")


def wait_until(check, what, limit=WAIT_LIMIT):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class Proc:
    """A server process (and its children, for nginx workers) with CPU and RSS readings."""

    def __init__(self, name, argv, cwd, env=None, nofile=None):
        """`nofile`: the open files limit the process runs under (`ulimit -n`)."""
        self.name = name
        log = open(os.path.join(cwd, f"{name}.log"), "wb")
        pinned = pin(cpu_for(name))

        def setup():
            if pinned:
                pinned()
            if nofile:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.popen = subprocess.Popen(argv, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                      env=env, start_new_session=True, preexec_fn=setup)

    def pids(self):
        pids = [self.popen.pid]
        try:
            out = subprocess.run(["pgrep", "-P", str(self.popen.pid)], capture_output=True, text=True).stdout
            pids += [int(p) for p in out.split()]
        except OSError:
            pass
        return pids

    def cpu_seconds(self):
        total = 0
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime + stime
            except (OSError, IndexError, ValueError):
                pass
        return total / CLK_TCK

    def status_mib(self, field):
        """A memory field of /proc/PID/status (VmRSS, VmHWM), summed over the process tree, MiB."""
        total = 0
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith(field + ":"):
                            total += int(line.split()[1])
            except OSError:
                pass
        return total / 1024

    def rss_mib(self):
        """Resident memory now."""
        return self.status_mib("VmRSS")

    def peak_rss_mib(self):
        """Peak resident memory."""
        return self.status_mib("VmHWM")

    def stop(self):
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()


class Relay(Proc):
    """The long-haul link (examples/wan_relay.rs): UDP and TCP on one port towards the gateway, with
    a fixed delay each way and UDP loss; `command()` cuts it, blocks UDP, and so on."""

    def __init__(self, work, upstream_port, one_way_ms, loss):
        self.name = "wan"
        self.popen = subprocess.Popen([RELAY, f"127.0.0.1:{upstream_port}", str(one_way_ms), str(loss)],
                                      cwd=work, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                      start_new_session=True, preexec_fn=pin(TEST_CPU))
        line = self.popen.stdout.readline()
        if not line.startswith("listening "):
            raise RuntimeError(f"wan_relay did not start: {line!r}")
        self.port = int(line.split()[1])

    def command(self, cmd):
        """Sends `cmd`; returns what the relay printed before its `ok`."""
        self.popen.stdin.write(cmd + "\n")
        self.popen.stdin.flush()
        said = []
        while (line := self.popen.stdout.readline().strip()) != "ok":
            if not line:
                raise RuntimeError(f"wan_relay stopped at {cmd!r}")
            said.append(line)
        return said

    def datagrams(self):
        """(forwarded, dropped on purpose) so far."""
        words = self.command("stats")[0].split()
        return int(words[1]), int(words[3])

    def stop(self):
        if self.popen.poll() is None:
            self.popen.stdin.close()
            try:
                self.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()


def nginx(work, name, server_block, workers=1, echo=False, nofile=None, stream=None):
    """nginx with `server_block` in its `http` block, or (`stream`) a `stream` block of its own."""
    prefix = os.path.join(work, name)
    os.makedirs(os.path.join(prefix, "logs"), exist_ok=True)
    conf = os.path.join(prefix, "nginx.conf")
    with open(conf, "w") as f:
        if echo:
            f.write(f"load_module {ECHO_MODULE};\n")
        if stream:
            f.write(f"load_module {STREAM_MODULE};\nstream {{ {stream} }}\n")
        f.write(f"""
daemon off;
master_process on;
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 75s;
  client_body_temp_path {prefix}/body;
  proxy_temp_path {prefix}/proxy;
  {server_block}
}}
""")
    return Proc(name, ["nginx", "-p", prefix, "-c", conf], prefix, nofile=nofile)


def count_lines(path):
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


class Shadow:
    """An nginx shadow that logs each request it receives, so both tools are counted alike."""

    def __init__(self, work, delay_ms=0, status=200, http2=False):
        self.port = free_port()
        # In the shadow's own directory: the agent watches its configuration's directory, and
        # a log written beside it woke that watch on every request (0.4 us of agent CPU each).
        self.log = os.path.join(work, f"shadow-{self.port}", "access.log")
        if delay_ms:
            body = f"echo_sleep {delay_ms / 1000:.3f}; echo 'shadow ok';"
        elif status == 204:
            body = "return 204;"
        else:
            body = "return 200 'shadow ok\\n';"
        self.proc = nginx(work, f"shadow-{self.port}", f"""
  server {{
    listen 127.0.0.1:{self.port} reuseport{" http2" if http2 else ""};
    access_log {self.log};
    location / {{ {body} }}
  }}""", echo=bool(delay_ms))
        wait_until(lambda: port_open(self.port), "shadow")

    def count(self):
        return count_lines(self.log)


def agent_uplink(gw_port, certs, admin, transport="auto"):
    """The `gateway:` and `admin:` blocks of a bench agent's configuration."""
    return f"""gateway:
  address: 127.0.0.1:{gw_port}
  transport: {transport}
  server_name: localhost
  ca: {certs}/ca.pem
  cert: {certs}/agent.pem
  key: {certs}/agent.key
admin: {{ listen: 127.0.0.1:{admin} }}
"""


class RpcPeer:
    """examples/rpc_peer.rs serving Thrift or Dubbo; `count()` is the calls it answered."""

    def __init__(self, work, name, protocol):
        self.port = free_port()
        self.counts = os.path.join(work, f"{name}.count")
        self.proc = Proc(name, [RPC_PEER, "serve", protocol, str(self.port), self.counts], work)
        wait_until(lambda: port_open(self.port), name)

    def count(self):
        try:
            with open(self.counts) as f:
                return int(f.read().strip() or 0)
        except (OSError, ValueError):
            return 0


class RedisServer:
    """A redis-server without persistence; `count()` is the SET calls it served (the shadow's
    deliveries in the TCP tee scenarios)."""

    def __init__(self, work, name):
        self.port = free_port()
        self.proc = Proc(name, ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", work], work)
        wait_until(lambda: port_open(self.port), name)

    def count(self):
        out = subprocess.run(["redis-cli", "-p", str(self.port), "INFO", "commandstats"], capture_output=True,
                             text=True, timeout=10).stdout
        m = re.search(r"cmdstat_set:calls=(\d+)", out)
        return int(m.group(1)) if m else 0


def teeway_listener_pair(work, routes, listeners):
    """A gateway with `routes` (YAML at the top level), and an agent with only `listeners` (its
    `tcp:` or `rpc:` block): the pair the Redis scenarios run through."""
    certs = os.path.join(work, "certs")
    subprocess.run([TEEWAY, "certs", "init", "--dir", certs], check=True, capture_output=True)
    gw_port, gw_admin = free_udp_and_tcp_port(), free_port()
    with open(os.path.join(work, "gateway.yaml"), "w") as f:
        f.write(f"""listen: 127.0.0.1:{gw_port}
tls: {{ ca: {certs}/ca.pem, cert: {certs}/gateway.pem, key: {certs}/gateway.key }}
{routes}admin: {{ listen: 127.0.0.1:{gw_admin} }}
""")
    gateway = Proc("gateway", [TEEWAY, "gateway", "--config", "gateway.yaml"], work,
                   env=dict(os.environ, RUST_LOG="warn"))
    wait_until(lambda: port_open(gw_admin), "gateway admin")
    port, admin = free_port(), free_port()
    with open(os.path.join(work, "agent.yaml"), "w") as f:
        f.write(f"""cluster: bench
{listeners.format(port=port)}{agent_uplink(gw_port, certs, admin)}""")
    agent = Proc("agent", [TEEWAY, "agent", "--config", "agent.yaml"], work, env=dict(os.environ, RUST_LOG="warn"))
    wait_until(lambda: port_open(port) and port_open(admin), "agent")
    wait_until(lambda: http_status(admin, "/readyz") == 200, "agent uplink")
    return port, (admin, gw_admin), [agent, gateway]


def teeway_tcp_pair(work, primary_port, shadow_port):
    """Gateway replaying listener `redis` to the shadow, and a TCP-only agent in front of the primary."""
    return teeway_listener_pair(work, f"""tcp_routes:
  - listener: redis
    targets: [127.0.0.1:{shadow_port}]
""", f"""tcp:
  - name: redis
    listen: 127.0.0.1:{{port}}
    primary: 127.0.0.1:{primary_port}
""")


def nginx_stream_proxy(work, primary_port):
    """nginx's stream module as a plain TCP proxy: the field's byte proxy, copying nothing."""
    port = free_port()
    proc = nginx(work, "proxy", "", stream=f"server {{ listen 127.0.0.1:{port}; proxy_pass 127.0.0.1:{primary_port}; }}")
    wait_until(lambda: port_open(port), "nginx stream proxy")
    return port, proc


def teeway_rpc_pair(work, primary_port, shadow_port, percentage=100, protocol="redis"):
    """Gateway replaying the `redis` rpc listener's copies to the shadow (rpc_routes), and an agent
    whose only listener is that `rpc:` listener in front of the primary, copying `percentage`
    (the listener keeps its name whatever `protocol` it speaks)."""
    return teeway_listener_pair(work, f"""rpc_routes:
  - protocol: {protocol}
    match: {{ listener: redis }}
    targets: [127.0.0.1:{shadow_port}]
""", f"""rpc:
  - name: redis
    protocol: {protocol}
    listen: 127.0.0.1:{{port}}
    primary: 127.0.0.1:{primary_port}
    percentage: {percentage}
""")


REDIS_REQUESTS = 200_000
# Pipelined runs send more: each round trip carries REDIS_PIPELINE commands.
REDIS_PIPELINED_REQUESTS = 2_000_000
REDIS_PIPELINE = 16


def run_redis_benchmark(port, connections, pipeline=1):
    """SET of random keys, one command per round trip (no pipelining: the latency shows), or
    `pipeline` per round trip (the throughput shows)."""
    requests = REDIS_REQUESTS if pipeline == 1 else REDIS_PIPELINED_REQUESTS
    argv = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", "set", "-n", str(requests),
            "-r", "100000", "-c", str(connections), "-P", str(pipeline), "--csv"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600, preexec_fn=pin(LOAD_CPU)).stdout
    rows = [line.replace('"', "").split(",") for line in out.splitlines() if line.startswith('"SET"')]
    if not rows:
        raise RuntimeError(f"redis-benchmark printed no SET row:\n{out}")
    row = rows[0]
    # test, rps, avg, min, p50, p95, p99, max (redis 7)
    return {"requests": requests, "errors": 0, "rps": float(row[1]), "p50_ms": float(row[4]),
            "p99_ms": float(row[6]), "p999_ms": None}


# Thrift calls (one per round trip, on every connection) and Dubbo invocations (16 in flight on
# each of a few connections, as a consumer multiplexes its calls on shared connections).
THRIFT_CALLS = 200_000
DUBBO_CALLS = 1_000_000
DUBBO_CONNECTIONS, DUBBO_IN_FLIGHT = 4, 16


def run_rpc_peer_load(port, protocol, connections, in_flight, calls):
    """examples/rpc_peer.rs's closed-loop client: the Thrift or Dubbo counterpart of redis-benchmark."""
    out = subprocess.run([RPC_PEER, "load", protocol, str(port), str(connections), str(in_flight), str(calls)],
                         capture_output=True, text=True, timeout=600, preexec_fn=pin(LOAD_CPU))
    if out.returncode != 0:
        raise RuntimeError(f"rpc_peer load: {out.stderr.strip()[:200]}")
    return json.loads(out.stdout)


def primary(work):
    port = free_port()
    proc = nginx(work, "primary", f"""
  server {{
    listen 127.0.0.1:{port} reuseport;
    location / {{ return 200 'ok\\n'; }}
  }}""", workers=1)
    wait_until(lambda: port_open(port), "primary")
    return port, proc


def grpc_primary(work):
    """An h2c server answering like a gRPC unary call: 200, application/grpc, grpc-status 0 in the
    trailers. h2load checks only the status; the agent forwards trailers as they come."""
    port = free_port()
    proc = nginx(work, "grpc-primary", f"""
  server {{
    listen 127.0.0.1:{port} reuseport http2;
    location / {{
      default_type application/grpc;
      add_trailer grpc-status 0;
      add_trailer grpc-message "";
      return 200 'ok';
    }}
  }}""", workers=1)
    wait_until(lambda: port_open(port), "gRPC primary")
    return port, proc


def nginx_proxy(work, primary_port, shadow=None, workers=2, nofile=None):
    port = free_port()
    mirror = ""
    mirror_loc = ""
    if shadow:
        mirror = "mirror /__mirror; mirror_request_body on;"
        mirror_loc = f"""
    location = /__mirror {{
      internal;
      proxy_pass http://shadow$request_uri;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}"""
    shadow_up = f"upstream shadow {{ server 127.0.0.1:{shadow.port}; keepalive 64; }}" if shadow else ""
    proc = nginx(work, "proxy", f"""
  upstream primary {{ server 127.0.0.1:{primary_port}; keepalive 64; }}
  {shadow_up}
  server {{
    listen 127.0.0.1:{port} reuseport;
    location / {{
      {mirror}
      proxy_pass http://primary;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
    {mirror_loc}
  }}""", workers=workers, nofile=nofile)
    wait_until(lambda: port_open(port), "nginx proxy")
    return port, proc


def teeway_pair(work, primary_port, shadow, percentage, start_gateway=True, transport="auto", grpc=False,
                sink=False, nofile=None, primary_protocol=None, wan=None):
    """Gateway (unless told not to) and agent. `grpc`: HTTP/2 end to end (the agent speaks the
    client's version to the primary, the gateway the copy's to the shadow). `sink`: the agent has
    no primary and takes a mirror feed on its port."""
    certs = os.path.join(work, "certs")
    if not os.path.exists(os.path.join(certs, "ca.pem")):
        subprocess.run([TEEWAY, "certs", "init", "--dir", certs], check=True, capture_output=True)
    procs = []
    gw_port = free_udp_and_tcp_port()
    gw_admin = None
    if start_gateway:
        gw_admin = free_port()
        with open(os.path.join(work, "gateway.yaml"), "w") as f:
            f.write(f"""listen: 127.0.0.1:{gw_port}
transports: [{"tls" if transport == "tls" else "quic, tls"}]
tls: {{ ca: {certs}/ca.pem, cert: {certs}/gateway.pem, key: {certs}/gateway.key }}
routes:
  - targets: [http://127.0.0.1:{shadow.port}]
    protocol: {"auto" if grpc else "http1"}
admin: {{ listen: 127.0.0.1:{gw_admin} }}
""")
        procs.append(Proc("gateway", [TEEWAY, "gateway", "--config", "gateway.yaml"], work,
                          env=dict(os.environ, RUST_LOG="warn")))
        wait_until(lambda: port_open(gw_admin), "gateway admin")
    uplink_port = gw_port
    if wan:
        # The agent reaches the gateway through the long-haul relay.
        relay = Relay(work, gw_port, *wan)
        procs.append(relay)
        uplink_port = relay.port
    port, admin = free_port(), free_port()
    with open(os.path.join(work, "agent.yaml"), "w") as f:
        f.write(f"""cluster: bench
listen: 127.0.0.1:{port}
{"sink: {}" if sink else f"primary: http://127.0.0.1:{primary_port}"}
primary_protocol: {primary_protocol or ("auto" if grpc else "http1")}
mirror: {{ percentage: {percentage} }}
{agent_uplink(uplink_port, certs, admin, transport)}""")
    agent = Proc("agent", [TEEWAY, "agent", "--config", "agent.yaml"], work, env=dict(os.environ, RUST_LOG="warn"),
                 nofile=nofile)
    procs.insert(0, agent)
    wait_until(lambda: port_open(port) and port_open(admin), "agent")
    if start_gateway and percentage > 0:
        wait_until(lambda: http_status(admin, "/readyz") == 200, "agent uplink")
    return port, (admin, gw_admin), procs


GRPC_MESSAGE = b"\x00\x00\x00\x00\x40" + bytes(range(64))  # one uncompressed 64-byte message


def http_status(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def metrics(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            try:
                out[series] = float(value)
            except ValueError:
                pass
    return out


def run_wrk(port, duration, connections, threads, post_1k=False):
    script = os.path.join(tempfile.gettempdir(), "teeway-bench-report.lua")
    with open(script, "w") as f:
        f.write((WRK_POST_1K if post_1k else "") + WRK_REPORT)
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency", "-s", script,
                          f"http://127.0.0.1:{port}/bench/item?id=42"],
                         capture_output=True, text=True, timeout=duration + 60, preexec_fn=pin(LOAD_CPU)).stdout
    m = re.search(r"BENCH (.*)", out)
    if not m:
        raise RuntimeError(f"wrk printed no report:\n{out}")
    fields = dict(kv.split("=") for kv in m.group(1).split())
    seconds = int(fields["duration_us"]) / 1e6
    return {
        "requests": int(fields["requests"]),
        "errors": int(fields["errors"]),
        "rps": int(fields["requests"]) / seconds,
        "p50_ms": int(fields["p50_us"]) / 1000,
        "p99_ms": int(fields["p99_us"]) / 1000,
        "p999_ms": int(fields["p999_us"]) / 1000,
    }


def run_wrk_killing_gateway(args, port, procs, work, gateway_admin):
    """wrk for the scenario's duration; a third of the way in the gateway is SIGKILLed and, a
    second later, started again on the same ports. Reports how long after its return it received
    copies again."""
    result = {}
    runner = threading.Thread(target=lambda: result.update(
        run_wrk(port, args.duration, args.connections, args.threads)))
    runner.start()
    time.sleep(args.duration / 3)
    gateway = next(p for p in procs if p.name == "gateway")
    os.killpg(gateway.popen.pid, signal.SIGKILL)
    gateway.popen.wait()
    time.sleep(1)
    procs.remove(gateway)
    again = Proc("gateway", [TEEWAY, "gateway", "--config", "gateway.yaml"], work,
                 env=dict(os.environ, RUST_LOG="warn"))
    procs.append(again)
    wait_until(lambda: port_open(gateway_admin), "gateway admin again")
    back = time.monotonic()
    wait_until(lambda: metrics(gateway_admin).get("teeway_gateway_received_total", 0) > 0, "copies again")
    reconnect = time.monotonic() - back
    runner.join()
    result["reconnect_s"] = reconnect
    return result


PAUSE_AT, PAUSE_FOR = 3.0, 3.0  # the paused gateway scenario: seconds into the run, and how long


def run_wrk_pausing_gateway(args, port, procs, admins):
    """wrk POSTing 1 KiB bodies for the scenario's duration; PAUSE_AT s in, the gateway is
    stopped (SIGSTOP) for PAUSE_FOR s, so that the agent's copies pile up against
    mirror.queue_bytes. Reports how much the bytes the agent counts against it (held bytes) and
    its resident memory grew meanwhile, each from just before the pause to its peak."""
    agent_admin, _ = admins
    agent = next(p for p in procs if p.name == "agent")
    gateway = next(p for p in procs if p.name == "gateway")
    result = {}
    runner = threading.Thread(target=lambda: result.update(
        run_wrk(port, args.duration, args.connections, args.threads, post_1k=True)))
    runner.start()
    time.sleep(PAUSE_AT)
    held = lambda: metrics(agent_admin).get("teeway_agent_mirror_held_bytes", 0) / 2**20
    rss_before, held_before = agent.rss_mib(), held()
    os.killpg(gateway.popen.pid, signal.SIGSTOP)
    try:
        rss_peak, held_peak = rss_before, held_before
        end = time.monotonic() + PAUSE_FOR
        while time.monotonic() < end:
            rss_peak, held_peak = max(rss_peak, agent.rss_mib()), max(held_peak, held())
            time.sleep(0.02)
    finally:
        os.killpg(gateway.popen.pid, signal.SIGCONT)
    runner.join()
    result["memory"] = (held_peak - held_before, rss_peak - rss_before)
    return result


CUT_AT, CUT_FOR = 3.0, 10.0  # the link cut scenario: seconds into the run, and how long
UDP_BLOCK_AT, UDP_BLOCK_FOR = 3.0, 8.0  # the blocked UDP scenario
WAN_FLOW_LIMIT = 30.0  # seconds: longest wait for copies (or QUIC) to come back


def gateway_received(admin):
    return sum(v for k, v in metrics(admin).items() if k.startswith("teeway_gateway_received_total"))


def uplink_links(admin, transport):
    return metrics(admin).get(f'teeway_agent_uplink_links{{transport="{transport}"}}', 0)


def udp_receive_buffer_drops():
    """Datagrams the kernel dropped for want of socket buffer space, machine-wide: a loss on top of
    the relay's own, which the WAN scenarios report."""
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Udp:")]
    header, values = rows[0], rows[1]
    return int(values[header.index("RcvbufErrors")])


def seconds_until(check, limit=WAN_FLOW_LIMIT):
    """Seconds until `check()` holds, polled every 20 ms; None if it never did within `limit`."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if check():
            return time.monotonic() - start
        time.sleep(0.02)
    return None


def run_wrk_wan(args, port, procs, admins, fault):
    """wrk POSTing 1 KiB bodies through the agent, whose uplink crosses the relay. `fault`: None
    (the scenario's duration), "cut" (the link cut for CUT_FOR s, CUT_AT s in: how long after
    the cut ends copies reach the gateway again), or "udp" (UDP blocked for UDP_BLOCK_FOR s:
    how long until copies arrive over TLS, and how long after UDP returns the agent is back on
    QUIC)."""
    agent_admin, gateway_admin = admins
    relay = next(p for p in procs if p.name == "wan")
    duration = {None: args.duration, "cut": CUT_AT + CUT_FOR + 5, "udp": UDP_BLOCK_AT + UDP_BLOCK_FOR + 12}[fault]
    result = {}
    runner = threading.Thread(target=lambda: result.update(
        run_wrk(port, int(duration), args.connections, args.threads, post_1k=True)))
    rcvbuf_before = udp_receive_buffer_drops()
    runner.start()
    wan = {}
    if fault == "cut":
        time.sleep(CUT_AT)
        relay.command("cut")
        time.sleep(CUT_FOR)
        before = gateway_received(gateway_admin)
        relay.command("restore")
        wan["flow_s"] = seconds_until(lambda: gateway_received(gateway_admin) > before)
    elif fault == "udp":
        time.sleep(UDP_BLOCK_AT)
        relay.command("block-udp")
        blocked = time.monotonic()
        # Copies are flowing over TLS when the agent has a TLS link and the gateway's count moves.
        if seconds_until(lambda: uplink_links(agent_admin, "tls") >= 1) is not None:
            before = gateway_received(gateway_admin)
            if seconds_until(lambda: gateway_received(gateway_admin) > before) is not None:
                wan["tls_s"] = time.monotonic() - blocked
        time.sleep(max(0.0, blocked + UDP_BLOCK_FOR - time.monotonic()))
        relay.command("unblock-udp")
        wan["quic_s"] = seconds_until(lambda: uplink_links(agent_admin, "quic") >= 1)
    runner.join()
    forwarded, dropped = relay.datagrams()
    wan["datagrams"] = f"{forwarded} relayed, {dropped} dropped by the relay, " \
                       f"{udp_receive_buffer_drops() - rcvbuf_before} by the kernel (receive buffers full)"
    result["wan"] = wan
    return result


# The fixed-rate scenarios' rate: half what the agent carried with every request mirrored
# (scenario 5), set when that scenario has run; this when it has not.
FIXED_RATE = {"per_s": 8000}


def run_fixed_rate(port, duration, per_s, work):
    """GETs at a fixed rate, open loop up to 64 in flight: `teeway replay --rate` of a GoReplay
    file of 1,000 requests, looped for about `duration` seconds (wrk has no fixed-rate mode)."""
    gor = os.path.join(work, "fixed-rate.gor")
    with open(gor, "w") as f:
        for i in range(1000):
            f.write(f"1 {i:024x} {1_700_000_000_000_000_000 + i * 1_000_000} 0\n"
                    f"GET /bench/item?id={i} HTTP/1.1\r\nHost: bench.local\r\nUser-Agent: fixed-rate\r\n\r\n"
                    "\n\U0001f435\U0001f648\U0001f649\n")
    loops = max(1, round(per_s * duration / 1000))
    out = subprocess.run([TEEWAY, "replay", "--target", f"http://127.0.0.1:{port}", "--rate", f"{per_s}/s",
                          "--loop", str(loops), "--concurrency", "64", "--report", "json", "--quiet", gor],
                         capture_output=True, text=True, timeout=duration * 4 + 60, preexec_fn=pin(LOAD_CPU))
    try:
        report = json.loads(out.stdout)
    except ValueError:
        raise RuntimeError(f"teeway replay printed no report: {out.stderr[-300:]}")
    latency = report["latency_ms"]
    return {
        "requests": report["sent"],
        "errors": report["sent"] - report["succeeded"],
        "rps": report["rate_per_s"],
        "p50_ms": latency["p50"],
        "p99_ms": latency["p99"],
        "p999_ms": None,
        "behind_ms": report["max_behind_schedule_ms"],
    }


def run_h2load(port, duration, connections, grpc=False):
    argv = ["h2load", "-c", str(connections), "-m", "10", "-t", "1", "-D", str(duration)]
    url = f"http://127.0.0.1:{port}/bench/item?id=42"
    if grpc:
        # A unary call: POST of one length-prefixed message with gRPC's headers.
        body = os.path.join(tempfile.gettempdir(), "teeway-bench-grpc.bin")
        with open(body, "wb") as f:
            f.write(GRPC_MESSAGE)
        argv += ["-d", body, "-H", "content-type: application/grpc", "-H", "te: trailers"]
        url = f"http://127.0.0.1:{port}/bench.Echo/Say"
    out = subprocess.run(argv + [url], capture_output=True, text=True, timeout=duration + 60,
                         preexec_fn=pin(LOAD_CPU)).stdout
    rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", out)
    if not (rps and done):
        raise RuntimeError(f"h2load printed no report:\n{out}")

    def ms(text):
        value = float(re.match(r"[\d.]+", text).group())
        return value / 1000 if text.endswith("us") else value * 1000 if text.endswith("s") and not text.endswith("ms") else value

    return {
        "requests": int(done.group(2)),
        "errors": int(done.group(3)) + int(done.group(4)),
        "rps": float(rps.group(1)),
        "p50_ms": None,  # h2load reports mean and sd, not percentiles
        "p99_ms": None,
        "p999_ms": None,
        "mean_ms": ms(mean.group(1)) if mean else None,
    }


ATTACK_SLOW, ATTACK_IDLE = 2000, 2000
ATTACK_NOFILE = 1024  # the production side's `ulimit -n` in the slowloris scenarios


def slowloris(port, slow, idle, seconds):
    """The attack, run as its own process (`bench.py --attack`): `slow` connections sending a
    request head one byte every 2 s, `idle` connections sending nothing, each reopened as soon
    as the server closes it, for `seconds`. Prints what it did."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (slow + idle + 256, slow + idle + 256))
    sel = selectors.DefaultSelector()
    opened = closed = 0
    head = b"GET /slow HTTP/1.1\r\nHost: victim\r\nX-Slow: " + b"a" * 10000

    def open_one(kind):
        nonlocal opened
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        except OSError:
            s.close()
            return
        opened += 1
        sel.register(s, selectors.EVENT_READ, {"kind": kind, "sent": 0})

    for _ in range(slow):
        open_one("slow")
    for _ in range(idle):
        open_one("idle")
    print("ready", flush=True)
    end = time.monotonic() + seconds
    next_trickle = time.monotonic()
    while time.monotonic() < end:
        for key, _ in sel.select(timeout=0.2):
            try:
                data = key.fileobj.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                closed += 1
                kind = key.data["kind"]
                sel.unregister(key.fileobj)
                key.fileobj.close()
                open_one(kind)
        if time.monotonic() >= next_trickle:
            next_trickle = time.monotonic() + 2
            for key in list(sel.get_map().values()):
                if key.data["kind"] == "slow" and key.data["sent"] < len(head):
                    try:
                        key.fileobj.send(head[key.data["sent"]:key.data["sent"] + 1])
                        key.data["sent"] += 1
                    except OSError:
                        pass
    print(f"opened={opened} closed_by_server={closed} open_at_end={len(sel.get_map())}", flush=True)


def run_wrk_under_slowloris(args, port):
    """wrk while `slowloris` holds connections to `port`; the attack starts first and has the
    server's descriptors filled before wrk connects."""
    attack = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--attack", str(port),
                               str(ATTACK_SLOW), str(ATTACK_IDLE), str(args.duration + 8)],
                              stdout=subprocess.PIPE, text=True, preexec_fn=pin(ATTACK_CPU))
    try:
        if attack.stdout.readline().strip() != "ready":
            raise RuntimeError("the slowloris attacker did not start")
        time.sleep(3)  # let the attack fill what it can before production traffic arrives
        probes = []
        stop = threading.Event()
        prober = threading.Thread(target=probe_new_connections, args=(port, probes, stop))
        prober.start()
        try:
            load = run_wrk(port, args.duration, args.connections, args.threads)
        finally:
            stop.set()
            prober.join()
        out, _ = attack.communicate(timeout=WAIT_LIMIT)
    finally:
        if attack.poll() is None:
            attack.kill()
            attack.wait()
    load["attack"] = out.strip().splitlines()[-1] if out.strip() else "no report"
    answered = sorted(t for t in probes if t is not None)
    load["attack"] += (f"; new clients: {len(answered)} of {len(probes)} answered within {PROBE_LIMIT:.0f} s"
                       + (f", median {answered[len(answered) // 2]:.2f} s, max {answered[-1]:.2f} s" if answered else ""))
    return load


PROBE_LIMIT = 10.0  # seconds a new client waits for its answer before it counts as refused


def probe_new_connections(port, probes, stop):
    """Once a second, a new client on a connection of its own (as a browser or a load balancer
    health check would be): the time to its answer, or None when none came within PROBE_LIMIT."""
    while not stop.is_set():
        started = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=PROBE_LIMIT) as s:
                s.settimeout(PROBE_LIMIT)
                s.sendall(b"GET /probe HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                answered = s.recv(12).startswith(b"HTTP/1.1 200")
            probes.append(time.monotonic() - started if answered else None)
        except OSError:
            probes.append(None)
        stop.wait(max(0.0, 1.0 - (time.monotonic() - started)))


def by_reason(scrape, metric, label="reason"):
    """`metric`'s non-zero series in a scrape, summed by `label`, as "value count, ..."."""
    counts = {}
    for k, v in scrape.items():
        found = re.search(metric + r'\{.*' + label + r'="([^"]+)"', k)
        if found and v:
            counts[found.group(1)] = counts.get(found.group(1), 0) + int(v)
    return ", ".join(f"{value} {n}" for value, n in counts.items())


def scenario(args, number, title, setup, driver="wrk", mirror=None):
    """Starts what `setup` starts, drives it, measures it, stops it."""
    work = tempfile.mkdtemp(prefix=f"teeway-bench-{number}-")
    procs = []
    row = {"n": number, "scenario": title}
    try:
        target_port, procs, shadow, admins = setup(work)
        agent_admin, gateway_admin = admins if admins else (None, None)
        cpu_before = {p.name: p.cpu_seconds() for p in procs}
        shadow_before = shadow.count() if shadow else 0
        if driver == "wrk":
            load = run_wrk(target_port, args.duration, args.connections, args.threads)
        elif driver == "wrk+slowloris":
            load = run_wrk_under_slowloris(args, target_port)
            row["attack"] = load.pop("attack")
        elif driver == "wrk+kill":
            load = run_wrk_killing_gateway(args, target_port, procs, work, gateway_admin)
            row["reconnect_s"] = load.pop("reconnect_s")
            gateway_admin = None  # the first gateway's counters died with it
        elif driver == "wrk+pause":
            load = run_wrk_pausing_gateway(args, target_port, procs, admins)
            row["memory"] = load.pop("memory")
        elif driver.startswith("wan"):
            load = run_wrk_wan(args, target_port, procs, admins, driver.partition("+")[2] or None)
            row["wan"] = load.pop("wan")
        elif driver == "rate":
            load = run_fixed_rate(target_port, args.duration, FIXED_RATE["per_s"], work)
        elif driver == "redis":
            load = run_redis_benchmark(target_port, args.connections)
        elif driver == "redis+P":
            load = run_redis_benchmark(target_port, args.connections, pipeline=REDIS_PIPELINE)
        elif driver == "thrift":
            load = run_rpc_peer_load(target_port, "thrift", args.connections, 1, THRIFT_CALLS)
        elif driver == "dubbo":
            load = run_rpc_peer_load(target_port, "dubbo", DUBBO_CONNECTIONS, DUBBO_IN_FLIGHT, DUBBO_CALLS)
        elif driver == "grpc":
            load = run_h2load(target_port, args.duration, args.connections, grpc=True)
        else:
            load = run_h2load(target_port, args.duration, args.connections)
        row.update(load)
        byte_stream = driver.startswith(("redis", "thrift", "dubbo"))
        if byte_stream and agent_admin and "rpc" in title:
            # RPC copies: resolved per command, counted in the rpc identity.
            rpc_sum = lambda m, name: int(sum(v for k, v in m.items() if k.startswith(name)))
            wait_until(lambda: rpc_sum(metrics(agent_admin), "teeway_agent_rpc_in_flight") == 0, "agent drain")
            wait_until(lambda: rpc_sum(metrics(gateway_admin), "teeway_gateway_rpc_replays_in_flight") == 0,
                       "gateway drain")
            settle_count(shadow)
            m, g = metrics(agent_admin), metrics(gateway_admin)
            row["rpc"] = (f"agent: {rpc_sum(m, 'teeway_agent_rpc_mirrored_total')} mirrored, "
                          f"{rpc_sum(m, 'teeway_agent_rpc_dropped_total')} dropped of "
                          f"{rpc_sum(m, 'teeway_agent_rpc_requests_total')} {'commands' if driver.startswith('redis') else 'calls'}"
                          + (f" ({by_reason(m, 'rpc_dropped_total')})" if by_reason(m, 'rpc_dropped_total') else "")
                          + f"; gateway: {by_reason(g, 'rpc_replays_total', label='outcome')}")
            row["delivered"] = (shadow.count() - shadow_before) / max(load["requests"], 1)
            agent_admin = gateway_admin = shadow = None
        if byte_stream and agent_admin:
            # TCP copies: resolved per connection, counted in the tcp identity.
            wait_until(lambda: sum(v for k, v in metrics(agent_admin).items()
                                   if k.startswith("teeway_agent_tcp_tee_in_flight")) == 0, "agent drain")
            wait_until(lambda: metrics(gateway_admin).get("teeway_gateway_tcp_replays_in_flight", 1) == 0,
                       "gateway drain")
            m = metrics(agent_admin)
            tcp = lambda name: int(sum(v for k, v in m.items() if k.startswith(name)))
            row["tcp_teed"] = f"agent: {tcp('teeway_agent_tcp_teed_total')} of {tcp('teeway_agent_tcp_connections_total')} connections teed, {tcp('teeway_agent_tcp_tee_dropped_total')} dropped"
            row["delivered"] = shadow.count() / max(load["requests"], 1)
            agent_admin = gateway_admin = shadow = None
        if shadow:
            if agent_admin:
                # Let the agent resolve every copy it holds before counting arrivals.
                wait_until(lambda: metrics(agent_admin).get("teeway_agent_mirror_in_flight", 1) == 0, "agent drain")
            settle_count(shadow)
            row["delivered"] = (shadow.count() - shadow_before) / max(load["requests"], 1)
        if agent_admin:
            m = metrics(agent_admin)
            row["agent_mirrored"] = int(m.get("teeway_agent_mirrored_total", 0))
            row["agent_dropped"] = int(sum(v for k, v in m.items() if k.startswith("teeway_agent_mirror_dropped_total")))
            row["agent_reasons"] = by_reason(m, "mirror_dropped_total")
            row["agent_seen"] = int(m.get("teeway_agent_requests_total", 0))
            row["agent_retries"] = int(m.get("teeway_agent_primary_retries_total", 0))
            row["agent_primary_errors"] = int(m.get("teeway_agent_primary_errors_total", 0))
        if gateway_admin:
            wait_until(lambda: metrics(gateway_admin).get("teeway_gateway_replay_in_flight", 1) == 0, "gateway drain")
            g = metrics(gateway_admin)
            row["gateway_received"] = int(sum(v for k, v in g.items() if k.startswith("teeway_gateway_received_total")))
            if "wan" in row:
                row["wan"]["copies_per_s"] = row["agent_mirrored"] / (load["requests"] / load["rps"])
            row["gateway_replayed"] = int(sum(v for k, v in g.items() if k.startswith("teeway_gateway_replayed_total")))
            row["gateway_shed"] = int(sum(v for k, v in g.items() if k.startswith("teeway_gateway_replay_failed_total")))
            row["gateway_reasons"] = by_reason(g, "replay_failed_total")
        per_k = []
        rss = []
        for p in procs:
            used = p.cpu_seconds() - cpu_before[p.name]
            per_k.append(f"{p.name} {1000 * used / max(load['requests'], 1):.3f}")
            row[f"cpu_{p.name}"] = used / max(load["requests"], 1)
            rss.append(f"{p.name} {p.peak_rss_mib():.1f}")
            row[f"rss_{p.name}_mib"] = p.peak_rss_mib()
        row["cpu_per_1k"] = ", ".join(per_k)
        row["peak_rss"] = ", ".join(rss)
    except Exception as e:  # a failed scenario is reported, the run goes on
        row["error"] = str(e).splitlines()[0][:200]
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(summary_line(row), flush=True)
    return row


def settle_count(shadow):
    """nginx mirror subrequests may still be on their way: wait until the count stops moving."""
    last, stable_since = shadow.count(), time.monotonic()
    deadline = time.monotonic() + WAIT_LIMIT
    while time.monotonic() < deadline and time.monotonic() - stable_since < 1.0:
        time.sleep(0.1)
        now = shadow.count()
        if now != last:
            last, stable_since = now, time.monotonic()


def summary_line(row):
    if "error" in row:
        return f"  {row['n']:>3}  {row['scenario']}: FAILED: {row['error']}"
    extra = f", delivered {row['delivered'] * 100:.2f}%" if "delivered" in row else ""
    if "reconnect_s" in row:
        extra += f", uplink back {row['reconnect_s']:.2f} s after the gateway returned"
    return f"  {row['n']:>3}  {row['scenario']}: {row['rps']:.0f} req/s{extra}"


def fmt(v, digits=2):
    return "-" if v is None else f"{v:.{digits}f}"


def versions():
    def first_line(cmd):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            return "?"
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} cores, {cpu}, Linux {platform.release()}",
        "teeway": first_line([TEEWAY, "--version"]),
        "nginx": first_line(["nginx", "-v"]),
        "wrk": first_line(["wrk", "-v"]),
        "h2load": first_line(["h2load", "--version"]),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--duration", type=int, default=10, help="seconds per scenario")
    ap.add_argument("--connections", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2, help="wrk threads")
    ap.add_argument("--out", default=HERE, help="where results.md and results.csv go")
    ap.add_argument("--only", help="comma-separated scenario numbers")
    args = ap.parse_args()
    only = set(args.only.split(",")) if args.only else None

    def mirror_nginx(delay_ms=0, status=200):
        def setup(work):
            pport, pproc = primary(work)
            shadow = Shadow(work, delay_ms, status)
            port, proxy = nginx_proxy(work, pport, shadow)
            return port, [proxy, pproc, shadow.proc], shadow, None
        return setup

    def with_teeway(percentage, delay_ms=0, gateway=True, transport="auto", nofile=None, wan=None):
        def setup(work):
            pport, pproc = primary(work)
            shadow = Shadow(work, delay_ms)
            port, admins, procs = teeway_pair(work, pport, shadow, percentage, gateway, transport, nofile=nofile,
                                              wan=wan)
            return port, procs + [pproc, shadow.proc], shadow if percentage > 0 else None, admins
        return setup

    def direct(work):
        pport, pproc = primary(work)
        return pport, [pproc], None, None

    def grpc_direct(work):
        pport, pproc = grpc_primary(work)
        return pport, [pproc], None, None

    def grpc_teeway(work):
        pport, pproc = grpc_primary(work)
        shadow = Shadow(work, http2=True)
        port, admins, procs = teeway_pair(work, pport, shadow, 100, grpc=True)
        return port, procs + [pproc, shadow.proc], shadow, admins

    def nginx_into_sink(work):
        """nginx mirroring to a teeway sink, which forwards to the gateway and the shadow."""
        pport, pproc = primary(work)
        shadow = Shadow(work)
        sink_port, admins, procs = teeway_pair(work, pport, shadow, 100, sink=True)
        sink = types.SimpleNamespace(port=sink_port)
        port, proxy = nginx_proxy(work, pport, sink)
        return port, [proxy] + procs + [pproc, shadow.proc], shadow, admins

    def redis_direct(work):
        server = RedisServer(work, "redis-primary")
        return server.port, [server.proc], None, None

    def redis_teeway(work):
        primary_redis, shadow_redis = RedisServer(work, "redis-primary"), RedisServer(work, "redis-shadow")
        port, admins, procs = teeway_tcp_pair(work, primary_redis.port, shadow_redis.port)
        return port, procs + [primary_redis.proc, shadow_redis.proc], shadow_redis, admins

    def redis_rpc(percentage=100):
        def setup(work):
            primary_redis, shadow_redis = RedisServer(work, "redis-primary"), RedisServer(work, "redis-shadow")
            port, admins, procs = teeway_rpc_pair(work, primary_redis.port, shadow_redis.port, percentage)
            return port, procs + [primary_redis.proc, shadow_redis.proc], shadow_redis, admins
        return setup

    def rpc_direct(protocol):
        def setup(work):
            server = RpcPeer(work, "rpc-primary", protocol)
            return server.port, [server.proc], None, None
        return setup

    def rpc_nginx_stream(protocol):
        def setup(work):
            server = RpcPeer(work, "rpc-primary", protocol)
            port, proxy = nginx_stream_proxy(work, server.port)
            return port, [proxy, server.proc], None, None
        return setup

    def rpc_teeway(protocol, tee):
        """`tee`: `rpc` (per-call copies) or `tcp` (the raw TCP tee)."""
        def setup(work):
            primary_peer = RpcPeer(work, "rpc-primary", protocol)
            shadow_peer = RpcPeer(work, "rpc-shadow", protocol)
            if tee == "rpc":
                port, admins, procs = teeway_rpc_pair(work, primary_peer.port, shadow_peer.port, protocol=protocol)
            else:
                port, admins, procs = teeway_tcp_pair(work, primary_peer.port, shadow_peer.port)
            return port, procs + [primary_peer.proc, shadow_peer.proc], shadow_peer, admins
        return setup

    def redis_nginx_stream(work):
        server = RedisServer(work, "redis-primary")
        port, proxy = nginx_stream_proxy(work, server.port)
        return port, [proxy, server.proc], None, None

    def proxy_only(work, nofile=None):
        pport, pproc = primary(work)
        port, proxy = nginx_proxy(work, pport, nofile=nofile)
        return port, [proxy, pproc], None, None

    def h2_goaway(work):
        """HTTP/2 clients through the agent to an h2c nginx primary that, as nginx does by
        default, sends GOAWAY after every 1,000 requests on a connection."""
        port = free_port()
        pproc = nginx(work, "h2-primary", f"""
  server {{
    listen 127.0.0.1:{port} reuseport http2;
    keepalive_requests 1000;
    location / {{ return 200 'ok\\n'; }}
  }}""", workers=1)
        wait_until(lambda: port_open(port), "h2 primary")
        shadow = Shadow(work)
        aport, admins, procs = teeway_pair(work, port, shadow, 0, primary_protocol="http2")
        return aport, procs + [pproc, shadow.proc], None, admins

    plan = [
        ("1", "direct to the primary (ceiling)", direct, "wrk"),
        ("2", "nginx reverse proxy, no mirror", proxy_only, "wrk"),
        ("3", "nginx mirror -> shadow (200 with body)", mirror_nginx(), "wrk"),
        ("3b", "nginx mirror -> shadow answering 204", mirror_nginx(status=204), "wrk"),
        ("4", "teeway agent, mirroring off (0%)", with_teeway(0), "wrk"),
        ("5", "teeway agent 100% -> QUIC gateway -> shadow", with_teeway(100), "wrk"),
        ("5r", "teeway 100% at a fixed rate, half of 5's throughput (teeway replay --rate)", with_teeway(100),
         "rate"),
        ("2r", "nginx reverse proxy, no mirror, at 5r's rate", proxy_only, "rate"),
        ("6", "nginx mirror, shadow answers in 200 ms", mirror_nginx(delay_ms=200), "wrk"),
        ("7", "teeway 100%, shadow answers in 200 ms", with_teeway(100, delay_ms=200), "wrk"),
        ("8", "teeway 100%, gateway down", with_teeway(100, gateway=False), "wrk"),
        ("9", "teeway 100% over TLS-over-TCP (transport: tls)", with_teeway(100, transport="tls"), "wrk"),
        ("10", "HTTP/2 clients (h2load) through teeway 100%", with_teeway(100), "h2load"),
        ("11", "teeway 100%, gateway SIGKILLed and restarted mid-run", with_teeway(100), "wrk+kill"),
        ("24", f"teeway 100%, 1 KiB POSTs, gateway paused (SIGSTOP) {PAUSE_FOR:.0f} s: memory against"
               " mirror.queue_bytes", with_teeway(100), "wrk+pause"),
        ("12", "gRPC unary calls (h2load, h2c) direct to the primary", grpc_direct, "grpc"),
        ("13", "gRPC unary calls through teeway 100% -> gateway -> h2c shadow", grpc_teeway, "grpc"),
        ("14", "nginx mirror -> teeway sink -> gateway -> shadow", nginx_into_sink, "wrk"),
        ("15", "redis-benchmark SET direct to redis-server", redis_direct, "redis"),
        ("16", "redis-benchmark SET through the teeway TCP tee 100% -> gateway -> shadow redis", redis_teeway,
         "redis"),
        ("15b", "redis-benchmark SET through nginx's stream proxy (a byte proxy, no mirroring)", redis_nginx_stream,
         "redis"),
        ("25", "redis-benchmark SET through a teeway rpc listener, every command copied -> gateway rpc_routes ->"
               " shadow redis", redis_rpc(), "redis"),
        ("25b", "as 25, the rpc listener copying nothing (percentage 0)", redis_rpc(0), "redis"),
        ("26", f"redis-benchmark SET pipelined (-P {REDIS_PIPELINE}) direct to redis-server", redis_direct,
         "redis+P"),
        ("26b", "as 26 through nginx's stream proxy", redis_nginx_stream, "redis+P"),
        ("27", "as 26 through the teeway TCP tee 100%", redis_teeway, "redis+P"),
        ("28", "as 26 through a teeway rpc listener, every command copied", redis_rpc(), "redis+P"),
        ("29", f"Thrift calls (framed binary, {THRIFT_CALLS:,}, one per round trip) direct to the primary"
               " (examples/rpc_peer)", rpc_direct("thrift"), "thrift"),
        ("29b", "as 29 through nginx's stream proxy", rpc_nginx_stream("thrift"), "thrift"),
        ("30", "as 29 through a teeway rpc listener, every call copied -> gateway rpc_routes -> shadow",
         rpc_teeway("thrift", "rpc"), "thrift"),
        ("30t", "as 29 through the teeway TCP tee 100%", rpc_teeway("thrift", "tcp"), "thrift"),
        ("31", f"Dubbo invocations ({DUBBO_CALLS:,}, {DUBBO_IN_FLIGHT} in flight on each of {DUBBO_CONNECTIONS}"
               " connections) direct to the provider (examples/rpc_peer)", rpc_direct("dubbo"), "dubbo"),
        ("31b", "as 31 through nginx's stream proxy", rpc_nginx_stream("dubbo"), "dubbo"),
        ("32", "as 31 through a teeway rpc listener, every invocation copied -> gateway rpc_routes -> shadow",
         rpc_teeway("dubbo", "rpc"), "dubbo"),
        ("32t", "as 31 through the teeway TCP tee 100%", rpc_teeway("dubbo", "tcp"), "dubbo"),
        ("17", f"nginx reverse proxy under slowloris ({ATTACK_SLOW} slow heads + {ATTACK_IDLE} idle, "
               f"ulimit -n {ATTACK_NOFILE})", lambda work: proxy_only(work, nofile=ATTACK_NOFILE), "wrk+slowloris"),
        ("18", "teeway agent 0% under the same slowloris", with_teeway(0, nofile=ATTACK_NOFILE), "wrk+slowloris"),
        ("19", "h2load through teeway 0% to an h2c nginx primary sending GOAWAY every 1,000 requests", h2_goaway,
         "h2load"),
        ("20", "WAN: 1 KiB POSTs through teeway 100%, uplink over a relay with 40 ms each way (80 ms RTT)",
         with_teeway(100, wan=(40, 0)), "wan"),
        ("21", "WAN: as 20 with 2% of UDP datagrams lost each way", with_teeway(100, wan=(40, 0.02)), "wan"),
        ("22", f"WAN: as 21, the link cut for {CUT_FOR:.0f} s", with_teeway(100, wan=(40, 0.02)), "wan+cut"),
        ("22b", f"WAN: as 22 with transport: quic (no TLS fallback)",
         with_teeway(100, transport="quic", wan=(40, 0.02)), "wan+cut"),
        ("23", f"WAN: as 20, UDP blocked for {UDP_BLOCK_FOR:.0f} s (transport: auto)", with_teeway(100, wan=(40, 0)),
         "wan+udp"),
    ]
    info = versions()
    print(f"teeway benchmark: {info['machine']}; {args.duration}s per scenario, {args.connections} connections")
    rows = []
    for number, title, setup, driver in plan:
        if only and number not in only:
            continue
        if driver == "rate":
            title = f"{title}: {FIXED_RATE['per_s']} req/s"
        rows.append(scenario(args, number, title, setup, driver))
        if number == "5" and rows[-1].get("rps"):
            FIXED_RATE["per_s"] = int(rows[-1]["rps"] / 2)
    rows.sort(key=lambda r: (int(re.match(r"\d+", r["n"]).group()), r["n"]))
    compare = compare_cost() if not only or "compare" in only else None
    write_results(args, info, rows, compare)


def compare_cost():
    """examples/compare_cost.rs on the test side's core: what a compare route costs the gateway per
    copy, and its memory with 100,000 distinct endpoints. Its markdown tables, or an error line."""
    print("compare: comparison cost and memory (examples/compare_cost)", flush=True)
    exe = os.path.join(ROOT, "target", "release", "examples", "compare_cost")
    run = subprocess.run(["taskset", "-c", str(TEST_CPU), exe], capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        return [f"- compare_cost failed (exit {run.returncode}): {run.stderr.strip()}", "", run.stdout]
    return run.stdout.rstrip("\n").split("\n")


def write_results(args, info, rows, compare=None):
    by = {r["n"]: r for r in rows if "error" not in r}
    md = [
        "# Benchmark results",
        "",
        f"- date: {info['date']}",
        f"- machine: {info['machine']}",
        f"- versions: {info['teeway']}; {info['nginx']}; {info['wrk']}; {info['h2load']}",
        f"- load: wrk -t{args.threads} -c{args.connections}, {args.duration} s per scenario, GET of a tiny response;"
        f" h2load -c{args.connections} -m10 for HTTP/2",
        f"- pinning: the production side (load generator, proxy or agent, primary) on core {PRODUCTION_CPU}; the test"
        f" side (gateway, shadows, WAN relay) on core {TEST_CPU}; CPU is user+system seconds per 1,000 requests; RSS"
        " is the peak (VmHWM) of each process during its scenario",
        "",
        "| # | scenario | req/s | p50 ms | p99 ms | p99.9 ms | errors | delivered to shadow | CPU s / 1k req | peak RSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        if "error" in r:
            md.append(f"| {r['n']} | {r['scenario']} | - | - | - | - | - | - | {r['error']} | - |")
            continue
        delivered = f"{r['delivered'] * 100:.2f}%" if "delivered" in r else "-"
        if "agent_seen" in r and "delivered" in r:
            delivered += f" (agent: {r['agent_mirrored']} mirrored, {r['agent_dropped']} dropped of {r['agent_seen']}"
            if r.get("agent_reasons"):
                delivered += f" ({r['agent_reasons']})"
            if "gateway_replayed" in r:
                delivered += f"; gateway: {r['gateway_replayed']} replayed, {r['gateway_shed']} failed or shed"
                if r.get("gateway_reasons"):
                    delivered += f": {r['gateway_reasons']}"
            delivered += ")"
        if "tcp_teed" in r:
            delivered += f" ({r['tcp_teed']})"
        if "rpc" in r:
            delivered += f" ({r['rpc']})"
        if "reconnect_s" in r:
            delivered += f"; uplink back {r['reconnect_s']:.2f} s after the gateway returned"
        if "attack" in r:
            delivered += f" (attack: {r['attack']})"
        if "memory" in r:
            held, rss = r["memory"]
            delivered += f" (while the gateway was paused: held bytes +{held:.1f} MiB, agent RSS +{rss:.1f} MiB)"
        if "wan" in r:
            delivered += " (" + wan_summary(r) + ")"
        if r.get("agent_retries"):
            delivered += f" (agent: {r['agent_retries']} requests retried on a new primary connection, " \
                         f"{r['agent_primary_errors']} answered 502)"
        md.append(f"| {r['n']} | {r['scenario']} | {r['rps']:.0f} | {fmt(r['p50_ms'])} | {fmt(r['p99_ms'])} |"
                  f" {fmt(r['p999_ms'])} | {r['errors']} | {delivered} | {r['cpu_per_1k']} | {r['peak_rss']} |")
    md += ["", "## Against the targets", ""]
    md += targets(by)
    if compare:
        md += ["", "## Comparing versions: what a compare route costs the gateway", "",
               "examples/compare_cost: the gateway's own comparison (`RouteCompare`) on one thread pinned to the test"
               f" side's core ({TEST_CPU}), defaults but `max_endpoints`: a candidate, a primary and a secondary answer"
               " each copy; the secondary differs in an id and a time (noise), the candidate in a price too in half"
               " the copies (all of them for the memory rows). Memory first, in a fresh process: RSS growth over the"
               " first tenth of the copies (endpoints and samples filling up to their bounds) and over the rest"
               " (nothing more kept).", ""]
        md += compare
    text = "\n".join(md) + "\n"
    print("\n" + text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text)
    keys = ["n", "scenario", "rps", "p50_ms", "p99_ms", "p999_ms", "errors", "delivered", "agent_seen",
            "agent_mirrored", "agent_dropped", "agent_retries", "gateway_received", "gateway_replayed", "gateway_shed", "reconnect_s",
            "attack", "wan", "cpu_per_1k", "peak_rss", "error"]
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def wan_summary(r):
    w = r["wan"]
    parts = [f"{w.get('copies_per_s', 0):.0f} copies/s acknowledged",
             f"books: agent mirrored {r.get('agent_mirrored')} = gateway received {r.get('gateway_received')}"
             if r.get("agent_mirrored") == r.get("gateway_received")
             else f"books DIFFER: agent mirrored {r.get('agent_mirrored')}, gateway received {r.get('gateway_received')}"]
    secs = lambda v: "never" if v is None else f"{v:.2f} s"
    if "flow_s" in w:
        parts.append(f"copies again {secs(w['flow_s'])} after the link returned")
    if "datagrams" in w:
        parts.append("UDP datagrams: " + w["datagrams"])
    if "quic_s" in w:
        parts.append(f"over TLS {secs(w.get('tls_s'))} after UDP was blocked, back on QUIC {secs(w['quic_s'])}"
                     " after it returned")
    return "; ".join(parts)


def targets(by):
    lines = []

    def check(name, ok, detail):
        lines.append(f"- {'met' if ok else 'MISSED'}: {name} ({detail})")

    def ratio(a, b, key="rps"):
        return by[a][key] / by[b][key] if a in by and b in by and by[b][key] else None

    r = ratio("5", "3")
    if r is not None:
        check("scenario 5 throughput at least 2x nginx mirror (3)", r >= 2, f"{r:.2f}x")
    r = ratio("5", "2")
    if r is not None:
        check("aim: scenario 5 matches nginx without mirroring (2)", r >= 1, f"{r:.2f}x")
    for n in ("7", "8"):
        r = ratio(n, "4")
        p = ratio(n, "4", "p99_ms")
        if r is not None and p is not None:
            check(f"scenario {n} throughput at least 95% of 4, p99 at most 1.1x", r >= 0.95 and p <= 1.1,
                  f"{r * 100:.1f}% of the throughput, p99 {p:.2f}x")
    r = ratio("6", "4")
    if r is not None:
        lines.append(f"- for comparison: nginx with a 200 ms mirror (6) runs at {r * 100:.1f}% of scenario 4")
    if "5" in by and "delivered" in by["5"]:
        d = by["5"]
        accounted = d["agent_mirrored"] + d["agent_dropped"] == d["agent_seen"]
        check("scenario 5: every request that did not reach the shadow is in a drop counter", accounted,
              f"delivered {d['delivered'] * 100:.2f}%, agent accounting {d['agent_mirrored']} + {d['agent_dropped']}"
              f" = {d['agent_seen']}")
    if "8" in by and "rss_agent_mib" in by["8"]:
        check("scenario 8 (gateway down): agent RSS within mirror.queue_bytes (16 MiB) + 64 MiB",
              by["8"]["rss_agent_mib"] < 16 + 64, f"{by['8']['rss_agent_mib']:.1f} MiB")
    if "24" in by and "memory" in by["24"]:
        held, rss = by["24"]["memory"]
        check("scenario 24: the agent's memory grows as mirror.queue_bytes counts it (held bytes), within 10%",
              held > 1 and abs(rss - held) <= 0.1 * held,
              f"held bytes +{held:.1f} MiB, RSS +{rss:.1f} MiB: {rss / held * 100 if held else 0:.0f}%")
    if "11" in by and "reconnect_s" in by["11"]:
        check("scenario 11: uplink back within 2 s of the gateway's return", by["11"]["reconnect_s"] < 2,
              f"{by['11']['reconnect_s']:.2f} s")
    for n in ("7",):
        if n in by and "4" in by and by[n].get("p99_ms") and by["4"].get("p99_ms"):
            lines.append(f"- client p99 with a 200 ms shadow ({n}): {by[n]['p99_ms']:.2f} ms; with mirroring off (4):"
                         f" {by['4']['p99_ms']:.2f} ms")
    for n, base, what in (("25", "15", "Redis, one command per round trip"), ("28", "26", "Redis, pipelined"),
                          ("30", "29", "Thrift"), ("32", "31", "Dubbo")):
        r = ratio(n, base)
        if r is not None:
            check(f"per-request mirroring, {what} ({n}), at least 0.6x of direct ({base})", r >= 0.6,
                  f"{r:.2f}x")
    for n, proxy in (("25", "15b"), ("28", "26b"), ("25b", "15b"), ("30", "29b"), ("32", "31b")):
        r = ratio(n, proxy)
        if r is not None:
            lines.append(f"- teeway's rpc listener copying {'nothing' if n == '25b' else 'every request'} ({n}) runs"
                         f" at {r:.2f}x nginx's stream proxy ({proxy}), which copies nothing")
    for n, base in (("15b", "15"), ("26b", "26"), ("29b", "29"), ("31b", "31")):
        r = ratio(n, base)
        if r is not None:
            lines.append(f"- nginx's stream proxy alone ({n}) runs at {r:.2f}x direct ({base})")
    for n, tee in (("25", "16"), ("28", "27"), ("30", "30t"), ("32", "32t")):
        r = ratio(n, tee)
        if r is not None:
            lines.append(f"- per-request mirroring ({n}) runs at {r:.2f}x the raw TCP tee ({tee})")
    r = ratio("13", "12")
    if r is not None:
        lines.append(f"- gRPC through teeway with every call mirrored (13) runs at {r * 100:.1f}% of direct calls (12)")
    r = ratio("14", "3b")
    if r is not None:
        lines.append(f"- nginx mirroring into a teeway sink (14) runs at {r * 100:.1f}% of nginx mirroring to a"
                     " 204 shadow (3b): the sink answers at once, whatever the gateway does")
    shares = [(tool, ratio(attacked, calm)) for tool, attacked, calm in (("nginx", "17", "2"), ("teeway", "18", "4"))]
    if all(r is not None for _, r in shares):
        (_, nginx_share), (_, teeway_share) = shares
        check("slowloris: teeway keeps at least nginx's share of its no-attack throughput (18/4 vs 17/2)",
              teeway_share >= nginx_share, f"teeway {teeway_share * 100:.1f}%, nginx {nginx_share * 100:.1f}%")
    if "19" in by:
        check("HTTP/2 primary GOAWAY (19): no client errors", by["19"]["errors"] == 0,
              f"{by['19']['errors']} errors, {by['19'].get('agent_retries', 0)} requests retried")
    wan = lambda n, key: by[n]["wan"].get(key) if n in by and "wan" in by[n] else None
    lossless, lossy = wan("20", "copies_per_s"), wan("21", "copies_per_s")
    if lossless and lossy:
        check("WAN (21 vs 20): with 2% loss the uplink carries at least 80% of what it carries without",
              lossy >= 0.8 * lossless, f"{lossy:.0f} vs {lossless:.0f} copies/s, {lossy / lossless * 100:.1f}%")
        check("WAN (21): at least 10,000 copies/s of 1 KiB requests at 80 ms RTT and 2% loss", lossy >= 10_000,
              f"{lossy:.0f} copies/s")
    for n in ("22", "22b"):
        if n in by and "wan" in by[n]:
            v = wan(n, "flow_s")
            check(f"WAN ({n}): copies flow again within 2 s of a cut link's return", v is not None and v <= 2,
                  "never" if v is None else f"{v:.2f} s")
    if "23" in by and "wan" in by["23"]:
        v = wan("23", "tls_s")
        check("WAN (23): blocked UDP detected and TLS carrying copies within 5 s", v is not None and v <= 5,
              "never" if v is None else f"{v:.2f} s")
        v = wan("23", "quic_s")
        check("WAN (23): back on QUIC after UDP returns", v is not None,
              "never" if v is None else f"{v:.2f} s")
    books = [n for n in ("20", "21", "22", "22b", "23") if n in by]
    if books:
        exact = [n for n in books if by[n].get("agent_mirrored") == by[n].get("gateway_received")]
        check("WAN: agent mirrored_total equals gateway received_total exactly", len(exact) == len(books),
              f"{len(exact)} of {len(books)} scenarios")
    rss = [r["rss_agent_mib"] for r in by.values() if "rss_agent_mib" in r]
    if rss:
        check("agent peak RSS under 64 MiB in every scenario", max(rss) < 64, f"max {max(rss):.1f} MiB")
    if "5r" in by and "delivered" in by["5r"]:
        d = by["5r"]
        check("fixed rate (5r): every copy delivered at half the agent's maximum", d["delivered"] >= 0.99995,
              f"delivered {d['delivered'] * 100:.2f}% at {d['rps']:.0f} req/s; the load generator was at most"
              f" {d.get('behind_ms', 0):.0f} ms behind its schedule")
    # Issue 20's table: the production side's cost against nginx's, same run.
    cpu = lambda n, proc: by[n].get(f"cpu_{proc}") if n in by else None
    pairs = [
        ("proxy CPU per request, mirroring off (4) vs nginx proxy (2)", cpu("4", "agent"), cpu("2", "proxy"), 1.0),
        ("proxy CPU per request, 100% mirrored (5) vs nginx proxy without mirror (2)", cpu("5", "agent"),
         cpu("2", "proxy"), 1.3),
        ("proxy CPU per request at a fixed rate, 100% mirrored (5r) vs nginx proxy (2r)", cpu("5r", "agent"),
         cpu("2r", "proxy"), 1.3),
        ("gateway CPU per copy (5) vs nginx proxy per request (2)", cpu("5", "gateway"), cpu("2", "proxy"), 1.0),
    ]
    for name, ours, theirs, bound in pairs:
        if ours and theirs:
            check(f"{name} at most {bound}x", ours <= bound * theirs,
                  f"{ours * 1e6:.1f} us vs {theirs * 1e6:.1f} us, {ours / theirs:.2f}x")
    for n in ("5", "10", "13"):
        if n in by and "delivered" in by[n]:
            check(f"delivery to a shadow that keeps up ({n}) 100.00%", by[n]["delivered"] >= 0.99995,
                  f"{by[n]['delivered'] * 100:.2f}%")
    return lines


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--attack":
        slowloris(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
        sys.exit(0)
    if not os.path.exists(TEEWAY):
        sys.exit(f"{TEEWAY} is missing: run tests/bench/run.sh, which builds it")
    main()
