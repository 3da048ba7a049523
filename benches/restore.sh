#!/usr/bin/env bash
# Restore throughput from the cloud-sink (issue 5, item 5). Results:
# BENCHMARKS.md §9.
#
#   benches/restore.sh [SCALE] [BLOB_MIB] [RUNS]      (defaults 20, 512, 3)
#
# Builds an archive of `sim gen --scale SCALE` (realistic gateway data,
# ~12 MiB per unit of scale) plus BLOB_MIB MiB of incompressible 64 MiB
# camera-like blobs, syncs it with a real edge-agent through Mosquitto and an
# aggregator into a cloud-sink on 127.0.0.1, then times RUNS runs of
# `cloud-sink restore` into fresh folders (/usr/bin/time: wall, CPU, peak
# RSS; and the sink server's CPU seconds) and checks the first restore
# byte for byte (diff -r, not timed).
# Throughput = logical bytes restored / wall time. The sink's objects are in
# the page cache (warm) after the first run. NO_BUILD=1 skips the cargo
# build. Installs mosquitto from Debian's packages when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE=${1:-20}; BLOB_MIB=${2:-512}; RUNS=${3:-3}

sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq mosquitto >/dev/null
fi
MOSQ=$(command -v mosquitto || echo /usr/sbin/mosquitto)
[ "${NO_BUILD:-0}" = 1 ] || cargo build --release -q -p sim -p edge-agent -p aggregator -p cloud-sink
B=$PWD/target/release
# shellcheck source=benches/lib.sh
. benches/lib.sh
ferry_workdir restore
ferry_stack 200ms

SRC=$W/src/archive
"$B/sim" gen --out "$SRC" --scale "$SCALE" 2>/dev/null
mkdir -p "$SRC/blobs"
for i in $(seq 1 $((BLOB_MIB / 64))); do head -c $((64 << 20)) /dev/urandom > "$SRC/blobs/cam$i.raw"; done
BYTES=$(find "$SRC" -type f -printf '%s\n' | awk '{s+=$1} END {print s}')
FILES=$(find "$SRC" -type f | wc -l)
t=$(date +%s.%N)
"$B/edge-agent" sync --broker "mqtt://127.0.0.1:$MP" --tenant acme --site p1 --device gw-r \
  --watch "$SRC" --state "$W/agent.redb" --key "$W/tenant.key" --timeout 1800 2>"$W/agent.log"
echo "archive: $FILES files, $BYTES bytes; synced to cloud-durable in $(echo "$(date +%s.%N) - $t" | bc -l | cut -c1-5) s" >&2
echo "sink objects: $(du -sb "$W/cloud" | cut -f1) bytes" >&2

# CPU seconds (user + system) of the sink server so far.
sink_cpu() { awk -v t="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / t}' "/proc/$SINK_PID/stat"; }
echo "| run | logical bytes | wall s | user s | sys s | peak RSS MiB | sink server CPU s | MB/s | MiB/s |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
for r in $(seq 1 "$RUNS"); do
  rm -rf "$W/out"
  sync; c0=$(sink_cpu); /usr/bin/time -o "$W/t" -f '%e %U %S %M' "$B/cloud-sink" restore --sink "http://127.0.0.1:$SP" \
    --device gw-r --key "$W/tenant.key" --out "$W/out" 2>"$W/restore.log"
  read -r wall user sys rss < "$W/t"
  printf '| %s | %s | %s | %s | %s | %d | %.2f | %.0f | %.0f |\n' "$r" "$BYTES" "$wall" "$user" "$sys" "$((rss / 1024))" \
    "$(echo "$(sink_cpu) - $c0" | bc -l)" \
    "$(echo "$BYTES / $wall / 1000000" | bc -l)" "$(echo "$BYTES / $wall / 1048576" | bc -l)"
  if [ "$r" = 1 ]; then
    diff -r --no-dereference "$SRC" "$W/out/archive" >/dev/null && echo "restore 1: byte-identical" >&2 \
      || { echo "restore 1 differs from the source" >&2; exit 1; }
  fi
done
if [ "${PERF:-0}" = 1 ] && command -v perf >/dev/null 2>&1; then
  rm -rf "$W/out"
  perf record -F 499 -g -o "$W/perf.data" -- "$B/cloud-sink" restore --sink "http://127.0.0.1:$SP" \
    --device gw-r --key "$W/tenant.key" --out "$W/out" 2>/dev/null >/dev/null
  perf report -i "$W/perf.data" --no-children --sort dso,sym --stdio 2>/dev/null | grep '%' | head -30
fi
