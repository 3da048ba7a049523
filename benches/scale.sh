#!/usr/bin/env bash
# Scale benchmarks (issue 5, item 4). Results: BENCHMARKS.md §8.
#
#   benches/scale.sh fanin AGENTS [FILES CHUNKS CHUNK_KIB]   (defaults 1 1 64)
#       One aggregator process behind Mosquitto, with a cloud-sink, all on
#       127.0.0.1; AGENTS simulated agents (benches/examples/fanin.rs: one
#       MQTT connection each, the real protocol, real sealed chunks) each
#       offer FILES files of CHUNKS unique chunks of CHUNK_KIB KiB. Prints the
#       generator's JSON: agents done, ingest MiB/s (sealed chunk bytes
#       durable at the aggregator per second of the ingest window), CPU
#       seconds and peak RSS (VmHWM) of aggregator, broker and sink.
#       PERF=1 also records `perf record -g` of the aggregator during the run
#       (installs linux-perf) and prints the top of `perf report`.
#   benches/scale.sh edge [FILES]                             (default 100000)
#       A real `edge-agent sync` of a folder of FILES small files (100–2,000
#       bytes) to cloud-durable, then a second sync with 1 % of them changed;
#       wall time and peak RSS from /usr/bin/time -v.
#
# Installs mosquitto (and linux-perf with PERF=1) from Debian's packages when
# missing. Everything runs on 127.0.0.1; nothing is left behind. NO_BUILD=1
# skips the cargo build.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-fanin}

sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
[ -x /usr/bin/time ] || need+=(time)
if [ "${PERF:-0}" = 1 ] && ! command -v perf >/dev/null 2>&1; then need+=(linux-perf); fi
if [ ${#need[@]} -gt 0 ]; then
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
MOSQ=$(command -v mosquitto || echo /usr/sbin/mosquitto)

# Binaries from cargo's target directory (CARGO_TARGET_DIR when set).
B=$(realpath -m "${CARGO_TARGET_DIR:-$PWD/target}")/release
W=$(mktemp -d /tmp/ferry-scale-XXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Ten thousand connections need as many descriptors in the broker and in the
# load generator.
ulimit -n "$(ulimit -Hn)"

start_region() { # pack delay
  MP=$(free_port); SP=$(free_port)
  # The production settings of docs/mosquitto.conf, without TLS/ACL, no persistence.
  printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_packet_size 8455168\nmax_queued_messages 100000\nmax_queued_bytes 1073741824\nmax_inflight_messages 100\nmax_connections -1\n' \
    "$MP" > "$W/m.conf"
  "$MOSQ" -c "$W/m.conf" 2>"$W/mosquitto.log" & MOSQ_PID=$!; pids+=($MOSQ_PID)
  "$B/cloud-sink" serve --data "$W/cloud" --listen "127.0.0.1:$SP" 2>"$W/sink.log" & SINK_PID=$!; pids+=($SINK_PID)
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$SP/v1/health" >/dev/null 2>&1 && break; sleep 0.1; done
  "$B/aggregator" run --broker "mqtt://127.0.0.1:$MP" --sink "http://127.0.0.1:$SP" --data "$W/region" \
    --pack-max-delay "$1" 2>"$W/agg.log" & AGG_PID=$!; pids+=($AGG_PID)
  for _ in $(seq 100); do grep -q "subscribed" "$W/agg.log" 2>/dev/null && break; sleep 0.1; done
}

case "$MODE" in
fanin)
  AGENTS=${2:-1000}; FILES=${3:-1}; CHUNKS=${4:-1}; KIB=${5:-64}
  [ "${NO_BUILD:-0}" = 1 ] || cargo build --release -q -p aggregator -p cloud-sink
  [ "${NO_BUILD:-0}" = 1 ] || cargo build --release -q -p benches --example fanin
  start_region 1s
  if [ "${PERF:-0}" = 1 ]; then
    perf record -F 199 -g -p "$AGG_PID" -o "$W/perf.data" 2>"$W/perf.log" & PERF_PID=$!
  fi
  "$B/examples/fanin" --broker "mqtt://127.0.0.1:$MP" --agents "$AGENTS" --files "$FILES" \
    --chunks "$CHUNKS" --chunk-kib "$KIB" --site "s$(date +%s)" --wait-cloud \
    --pids "aggregator=$AGG_PID,mosquitto=$MOSQ_PID,cloud-sink=$SINK_PID"
  if [ "${PERF:-0}" = 1 ]; then
    kill -INT "$PERF_PID"; wait "$PERF_PID" 2>/dev/null || true
    perf report -i "$W/perf.data" --no-children --sort dso,sym --stdio 2>/dev/null | grep -v '^$' | grep '%' | head -40
  fi
  echo "aggregator log warnings+errors: $(grep -ciE "warn|error" "$W/agg.log" || true)" >&2
  grep -iE "warn|error" "$W/agg.log" | cut -c1-300 | sort | uniq -c | sort -rn | head -5 >&2 || true
  ;;
edge)
  N=${2:-100000}
  [ "${NO_BUILD:-0}" = 1 ] || cargo build --release -q -p aggregator -p cloud-sink -p edge-agent
  start_region 200ms
  "$B/edge-agent" keygen --out "$W/tenant.key" 2>/dev/null
  python3 - "$W/src/archive" "$N" <<'EOF'
import os, random, sys
root, n = sys.argv[1], int(sys.argv[2])
rnd = random.Random(1)
for i in range(n):
    d = os.path.join(root, f"d{i // 1000:03}")
    if i % 1000 == 0:
        os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"sensor_{i:06}.csv"), "w") as f:
        f.write("".join(f"{i},{j},{rnd.random():.6f}\n" for j in range(rnd.randint(4, 80))))
EOF
  echo "$N files, $(du -sb "$W/src/archive" | cut -f1) bytes" >&2
  TIME="/usr/bin/time -o $W/t -f %e\t%U\t%S\t%M"
  sync_once() {
    $TIME "$B/edge-agent" sync --broker "mqtt://127.0.0.1:$MP" --tenant acme --site p1 --device big \
      --watch "$W/src/archive" --state "$W/agent.redb" --key "$W/tenant.key" --timeout 3600 2>"$W/agent.log"
    read -r wall user sys rss < "$W/t"
    printf '| %s | %s | %s | %s | %.1f |\n' "$1" "$wall" "$user" "$sys" "$(echo "$rss / 1024" | bc -l)"
  }
  echo "| run | wall s | user s | sys s | peak RSS MiB |"
  echo "|---|---:|---:|---:|---:|"
  sync_once "initial sync, $N files"
  python3 - "$W/src/archive" "$N" <<'EOF'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
for i in range(0, n, 100):
    with open(os.path.join(root, f"d{i // 1000:03}", f"sensor_{i:06}.csv"), "a") as f:
        f.write(f"{i},appended,1.0\n")
EOF
  sync_once "1 % of files appended, rescan of all"
  sync_once "no change, rescan of all"
  "$B/edge-agent" status --state "$W/agent.redb" --json | python3 -c 'import json,sys; d=json.load(sys.stdin); print({k: d.get(k) for k in ("files_tracked","changes_recorded","pending_changes")})' >&2 || true
  ls -l "$W/agent.redb" | awk '{print "state file bytes:", $5}' >&2
  ;;
*)
  echo "usage: $0 fanin AGENTS [FILES CHUNKS CHUNK_KIB] | edge [FILES]" >&2
  exit 2
  ;;
esac
