#!/usr/bin/env bash
# Peer comparison on the same data: Ferry next to rsync (--no-whole-file,
# with and without -z), restic, borg and casync, on one generated factory
# gateway archive (sim gen) and hourly change steps (sim step).
#
#   benches/compare.sh [STEPS] [SCALE]        (defaults: 3 steps, scale 1.0 ≈ 12 MiB)
#   FERRY_ONLY=1 benches/compare.sh ...        (skip the peers: a quick Ferry-only run)
#
# Per round and tool it prints bytes, wall time, CPU time and peak RSS, and
# the ideal lower bound (zstd -3 of exactly the new and changed bytes).
# Bytes: Ferry = all MQTT payload bytes the agent published (status
# wire_bytes_sent); rsync = "Total bytes sent"; restic, borg, casync = growth
# of the repository / chunk store on disk. Installs the tools from Debian's
# packages when missing. Everything runs on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-3}
SCALE=${2:-1.0}

need=()
for t in mosquitto:mosquitto restic:restic borg:borgbackup rsync:rsync casync:casync; do
  command -v "${t%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${t%%:*}" ] || need+=("${t#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
MOSQ=$(command -v mosquitto || echo /usr/sbin/mosquitto)

cargo build --release -q -p sim -p edge-agent -p aggregator -p cloud-sink
B=$PWD/target/release
# shellcheck source=benches/lib.sh
. benches/lib.sh
ferry_workdir compare
ferry_stack 200ms

SRC=$W/src/archive
mkdir -p "$W/src"
"$B/sim" gen --out "$SRC" --scale "$SCALE" 2>/dev/null
export RESTIC_PASSWORD=bench BORG_PASSPHRASE=bench BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes
restic init -q --repository-version 2 -r "$W/restic" >/dev/null
borg init --encryption=repokey "$W/borg" 2>/dev/null
mkdir -p "$W/rsync" "$W/rsync-z" "$W/castore" "$W/caidx"

TIME="/usr/bin/time -o $W/t -f %e\t%U\t%S\t%M"
size() { du -sb "$1" | cut -f1; }
counter() { "$B/edge-agent" status --state "$W/agent.redb" --json | python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }
row() { # round tool bytes ideal
  read -r wall user sys rss < "$W/t"
  printf '| %s | %s | %s | %.2fx | %s | %.2f | %s |\n' "$1" "$2" "$3" "$(echo "$3 / $4" | bc -l)" "$wall" \
    "$(echo "$user + $sys" | bc -l)" "$((rss / 1024))"
}

echo "| round | tool | bytes | vs ideal | wall s | CPU s | peak RSS MiB |"
echo "|---|---|---:|---:|---:|---:|---:|"
for round in $(seq 0 "$STEPS"); do
  if [ "$round" -gt 0 ]; then
    rm -rf "$W/prev"; cp -a "$SRC" "$W/prev"
    "$B/sim" step --dir "$SRC" --step "$round" --scale "$SCALE" 2>/dev/null
    name="hour $round"
  else
    name="initial"
  fi
  ideal=$("$B/sim" ideal "$W/prev" "$SRC" | python3 -c 'import json,sys; print(json.load(sys.stdin)["zstd3_bytes"])')
  printf '| %s | ideal (zstd -3 of changed bytes) | %s | 1.00x | | | |\n' "$name" "$ideal"

  before=0 cbefore=0
  if [ -f "$W/agent.redb" ]; then
    before=$(counter wire_bytes_sent); cbefore=$(counter chunk_bytes_sent)
  fi
  $TIME "$B/edge-agent" sync --broker "mqtt://127.0.0.1:$MP" --tenant acme --site p1 --device gw1 \
    --watch "$SRC" --state "$W/agent.redb" --key "$W/tenant.key" --timeout 300 2>"$W/agent.log"
  after=$(counter wire_bytes_sent); cafter=$(counter chunk_bytes_sent)
  row "$name" "Ferry (MQTT payload, to cloud-durable)" "$((after - before))" "$ideal"
  # Not a table row: how Ferry's bytes split between sealed chunk payload and
  # everything else (manifests, protocol messages, CBOR framing).
  echo "  (Ferry $name: chunk payload $((cafter - cbefore)), manifests and protocol $((after - before - cafter + cbefore)))" >&2
  [ -n "${FERRY_ONLY:-}" ] && continue

  $TIME rsync -a --no-whole-file --stats "$SRC/" "$W/rsync/" > "$W/rs.out"
  row "$name" "rsync --no-whole-file" "$(grep 'Total bytes sent' "$W/rs.out" | tr -dc 0-9)" "$ideal"
  $TIME rsync -az --no-whole-file --stats "$SRC/" "$W/rsync-z/" > "$W/rs.out"
  row "$name" "rsync -z --no-whole-file" "$(grep 'Total bytes sent' "$W/rs.out" | tr -dc 0-9)" "$ideal"

  b0=$(size "$W/restic")
  $TIME restic backup -q -r "$W/restic" "$SRC" >/dev/null
  row "$name" "restic 0.14 (repo growth, compression auto)" "$(($(size "$W/restic") - b0))" "$ideal"

  b0=$(size "$W/borg")
  $TIME borg create --compression zstd,3 "$W/borg::r$round" "$SRC"
  row "$name" "borg 1.2 (repo growth, zstd,3)" "$(($(size "$W/borg") - b0))" "$ideal"

  b0=$(($(size "$W/castore") + $(size "$W/caidx")))
  $TIME casync make --store="$W/castore" "$W/caidx/r$round.caidx" "$SRC" >/dev/null 2>&1
  row "$name" "casync (store + index growth)" "$(($(size "$W/castore") + $(size "$W/caidx") - b0))" "$ideal"
done
