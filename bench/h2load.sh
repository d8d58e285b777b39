#!/usr/bin/env bash
# HTTP/2 load through the proxy: `pooled-proxy demo` (proxy + demo upstream) on a free port,
# then h2load over h2c (prior knowledge), 8 connections x 10 concurrent streams.
#   bench/h2load.sh [REQUESTS] [PATH]        e.g. bench/h2load.sh 50000 /bytes/10000
# Exits non-zero if any request failed or errored. Needs h2load (apt: nghttp2-client).
set -euo pipefail
cd "$(dirname "$0")/.."
requests="${1:-20000}"
path="${2:-/echo}"
command -v h2load >/dev/null || { echo "h2load not found: apt-get install nghttp2-client" >&2; exit 2; }
proxy_bin=".venv/bin/pooled-proxy"
[ -x "$proxy_bin" ] || proxy_bin="pooled-proxy"

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log=$(mktemp)
"$proxy_bin" demo --listen "127.0.0.1:$port" >/dev/null 2>"$log" &  # stdout: the access log
proxy_pid=$!
trap 'kill "$proxy_pid" 2>/dev/null; wait "$proxy_pid" 2>/dev/null; rm -f "$log"' EXIT
for _ in $(seq 100); do
    grep -q "listening on http://127.0.0.1:$port" "$log" && break
    sleep 0.1
done
grep -q "listening on http://127.0.0.1:$port" "$log" || { cat "$log" >&2; exit 1; }

out=$(h2load -n "$requests" -c 8 -m 10 "http://127.0.0.1:$port$path")
echo "$out"
echo "$out" | grep -q "Application protocol: h2c" || { echo "not h2c" >&2; exit 1; }
echo "$out" | grep -Eq "requests: .* 0 failed, 0 errored" || { echo "failures" >&2; exit 1; }
