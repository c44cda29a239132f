#!/usr/bin/env bash
# teeway vs nginx mirror, side by side: one command, one table.
#   tests/bench/run.sh                 full run (10 s per scenario, ~10 minutes)
#   tests/bench/run.sh --duration 3    quicker
#   tests/bench/run.sh --only 3,5      some scenarios
# Installs what it needs (Debian: nginx, its echo and stream modules, wrk, h2load, Redis), builds teeway in release
# mode, runs every scenario on loopback with ports it picks, stops everything it started, and
# writes results.md and results.csv beside this script (or where --out says).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"

need=()
command -v nginx >/dev/null || need+=(nginx)
[ -f /usr/lib/nginx/modules/ngx_http_echo_module.so ] || need+=(libnginx-mod-http-echo)
[ -f /usr/lib/nginx/modules/ngx_stream_module.so ] || need+=(libnginx-mod-stream)
command -v redis-benchmark >/dev/null || need+=(redis-server redis-tools)
command -v wrk >/dev/null || need+=(wrk)
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v python3 >/dev/null || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
# The packaged nginx service is not used; the harness starts its own instances.
command -v systemctl >/dev/null && systemctl is-active --quiet nginx 2>/dev/null && echo "note: a system nginx is running; it is left alone"

(cd "$root" && cargo build --release --locked --bin teeway --example wan_relay --example rpc_peer --example compare_cost)
exec python3 "$here/bench.py" "$@"
