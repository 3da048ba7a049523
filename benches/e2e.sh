#!/usr/bin/env bash
# End-to-end benchmarks (issue 5, item 3). Results: BENCHMARKS.md §7.
#
#   benches/e2e.sh latency [SAMPLES] [PACK_DELAY]       (defaults 40, 1s)
#       Mosquitto, cloud-sink serve, aggregator run (--pack-max-delay
#       PACK_DELAY) and an `edge-agent run` daemon (--scan-interval 1), as
#       separate processes on 127.0.0.1. SAMPLES times: write a new 4 KiB file
#       into the watch folder and poll the sink's /v1/files (every 10 ms)
#       until that path is listed, i.e. cloud-durable. Prints p50/p90/p99/max.
#   benches/e2e.sh catchup [RATE_MBIT] [MIB] [OUTAGE_S]  (defaults 1, 6, 40)
#       The region (Mosquitto, aggregator, cloud-sink) in one network
#       namespace, an `edge-agent run` daemon in another, joined by a veth pair
#       whose gateway end has a `tc tbf` of RATE_MBIT (both namespaces are
#       created here and deleted at exit). After a first sync, the link goes
#       down for OUTAGE_S seconds while MIB MiB of incompressible files are
#       written; then it comes up. Reports time from link-up to cloud-durable,
#       the transfer time (first to last data byte seen on the region's veth),
#       and goodput (new file bytes / transfer time) ÷ link rate.
#
# NO_BUILD=1 skips the cargo build. Needs root for the namespaces. Installs mosquitto, iproute2 and curl from
# Debian's packages when missing. Nothing leaves 127.0.0.1 or the namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-latency}

sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v tc >/dev/null 2>&1 || [ -x /usr/sbin/tc ] || need+=(iproute2)
command -v curl >/dev/null 2>&1 || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
MOSQ=$(command -v mosquitto || echo /usr/sbin/mosquitto)
[ "${NO_BUILD:-0}" = 1 ] || cargo build --release -q -p edge-agent -p aggregator -p cloud-sink
B=$PWD/target/release
W=$(mktemp -d /tmp/ferry-e2e-XXXX)
pids=()
NS_R=""; NS_G=""
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "$NS_G" ] && ip netns del "$NS_G" 2>/dev/null || true
  [ -n "$NS_R" ] && ip netns del "$NS_R" 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
"$B/edge-agent" keygen --out "$W/tenant.key" 2>/dev/null
mkdir -p "$W/src/archive"
printf 'ts,v\n1,2\n' > "$W/src/archive/first.csv"

case "$MODE" in
latency)
  SAMPLES=${2:-40}; PACK_DELAY=${3:-1s}
  MP=$(free_port); SP=$(free_port)
  printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_packet_size 8455168\n' "$MP" > "$W/m.conf"
  "$MOSQ" -c "$W/m.conf" 2>"$W/mosquitto.log" & pids+=($!)
  "$B/cloud-sink" serve --data "$W/cloud" --listen "127.0.0.1:$SP" 2>"$W/sink.log" & pids+=($!)
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$SP/v1/health" >/dev/null 2>&1 && break; sleep 0.1; done
  "$B/aggregator" run --broker "mqtt://127.0.0.1:$MP" --sink "http://127.0.0.1:$SP" --data "$W/region" \
    --pack-max-delay "$PACK_DELAY" 2>"$W/agg.log" & pids+=($!)
  "$B/edge-agent" run --broker "mqtt://127.0.0.1:$MP" --tenant acme --site p1 --device gw-e2e \
    --watch "$W/src/archive" --state "$W/agent.redb" --key "$W/tenant.key" --scan-interval 1 \
    2>"$W/agent.log" & pids+=($!)
  python3 - "$W/src/archive" "http://127.0.0.1:$SP" "$SAMPLES" "$PACK_DELAY" <<'EOF'
import json, os, random, sys, time, urllib.request
root, sink, n, delay = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
def listed(path):
    url = f"{sink}/v1/files?device=gw-e2e&path={path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return len(json.load(r)) > 0
    except Exception:
        return False
t = time.time()
while not listed("archive/first.csv"):
    if time.time() - t > 60: sys.exit("the first file never became cloud-durable")
    time.sleep(0.1)
rnd = random.Random(1)
lat = []
for i in range(n):
    time.sleep(rnd.uniform(0, 1.0))  # land anywhere in the scan cycle
    p = f"w{i:04}.bin"
    t0 = time.time()
    with open(os.path.join(root, p), "wb") as f:
        f.write(os.urandom(4096))
    while not listed(f"archive/{p}"):
        if time.time() - t0 > 120: sys.exit(f"{p} not cloud-durable after 120 s")
        time.sleep(0.01)
    lat.append(time.time() - t0)
lat.sort()
q = lambda x: lat[min(len(lat) - 1, int(round(x * (len(lat) - 1))))]
print(f"| samples | pack delay | p50 s | p90 s | p99 s | max s | min s |")
print(f"|---:|---|---:|---:|---:|---:|---:|")
print(f"| {n} | {delay} | {q(0.5):.2f} | {q(0.9):.2f} | {q(0.99):.2f} | {lat[-1]:.2f} | {lat[0]:.2f} |")
EOF
  ;;
catchup)
  RATE=${2:-1}; MIB=${3:-6}; OUTAGE=${4:-40}
  tag=$(( $$ % 200 + 20 ))
  NS_R="ferry-bench-r$tag"; NS_G="ferry-bench-g$tag"
  VR="fbr$tag"; VG="fbg$tag"; ADDR="10.214.$tag.1"
  ip netns add "$NS_R"; ip netns add "$NS_G"
  ip link add "$VR" type veth peer name "$VG"
  ip link set "$VR" netns "$NS_R"; ip link set "$VG" netns "$NS_G"
  ip -n "$NS_R" addr add "$ADDR/24" dev "$VR"
  ip -n "$NS_G" addr add "10.214.$tag.2/24" dev "$VG"
  for x in "$NS_R:$VR" "$NS_G:$VG"; do
    ip -n "${x%%:*}" link set "${x#*:}" up; ip -n "${x%%:*}" link set lo up
  done
  # Burst: at least rate/HZ; 32 KB covers 20 Mbit/s at HZ 250 with room.
  tc -n "$NS_G" qdisc add dev "$VG" root tbf rate "${RATE}mbit" burst 32kb latency 400ms
  printf 'listener 1883 %s\nallow_anonymous true\nmax_packet_size 8455168\n' "$ADDR" > "$W/m.conf"
  ip netns exec "$NS_R" "$MOSQ" -c "$W/m.conf" 2>"$W/mosquitto.log" & pids+=($!)
  ip netns exec "$NS_R" "$B/cloud-sink" serve --data "$W/cloud" --listen 127.0.0.1:8080 2>"$W/sink.log" & pids+=($!)
  for _ in $(seq 100); do ip netns exec "$NS_R" curl -sf http://127.0.0.1:8080/v1/health >/dev/null 2>&1 && break; sleep 0.1; done
  ip netns exec "$NS_R" "$B/aggregator" run --broker "mqtt://$ADDR:1883" --sink http://127.0.0.1:8080 \
    --data "$W/region" --pack-max-delay 200ms 2>"$W/agg.log" & pids+=($!)
  ip netns exec "$NS_G" "$B/edge-agent" run --broker "mqtt://$ADDR:1883" --tenant acme --site p1 --device gw-slow \
    --watch "$W/src/archive" --state "$W/agent.redb" --key "$W/tenant.key" --scan-interval 2 \
    2>"$W/agent.log" & pids+=($!)
  ip netns exec "$NS_R" python3 - "$W/src/archive" "$RATE" "$MIB" "$OUTAGE" "$NS_G" "$VG" "$VR" <<'EOF'
import json, os, subprocess, sys, time, urllib.request
root, rate, mib, outage, ns_g, vg, vr = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), *sys.argv[5:]
sink = "http://127.0.0.1:8080"
def count(glob):
    try:
        with urllib.request.urlopen(f"{sink}/v1/files?device=gw-slow&path={glob}", timeout=5) as r:
            return len(json.load(r))
    except Exception:
        return -1
def rx():
    with open(f"/sys/class/net/{vr}/statistics/rx_bytes") as f:
        return int(f.read())
t = time.time()
while count("archive/first.csv") < 1:
    if time.time() - t > 120: sys.exit("first sync never became cloud-durable")
    time.sleep(0.2)
subprocess.run(["ip", "-n", ns_g, "link", "set", vg, "down"], check=True)
t_down = time.time()
os.makedirs(os.path.join(root, "backlog"))
per = 1 << 20
for i in range(mib):
    with open(os.path.join(root, "backlog", f"blob{i:04}.raw"), "wb") as f:
        f.write(os.urandom(per))
time.sleep(max(0.0, outage - (time.time() - t_down)))
rx0 = rx()
subprocess.run(["ip", "-n", ns_g, "link", "set", vg, "up"], check=True)
t_up = time.time()
samples = []
while True:
    samples.append((time.time(), rx() - rx0))
    if count("archive/backlog/*") >= mib:
        break
    if time.time() - t_up > 3600: sys.exit("backlog not cloud-durable after an hour")
    time.sleep(0.1)
t_done = time.time()
total_rx = samples[-1][1]
# Transfer: from the last sample with < 64 KB received (handshake, Hello,
# batch) to the first sample with everything but the last 16 KB (acks,
# CloudAck) received.
start = max(s[0] for s in samples if s[1] < 64 << 10)
end = min(s[0] for s in samples if s[1] >= total_rx - (16 << 10))
data = mib * per
link = rate * 1e6 / 8
xfer = end - start
print("| link | backlog | outage s | link-up to cloud-durable s | reconnect + handshake s | transfer s | bytes on the veth / data | goodput / link rate |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
print(f"| {rate:g} Mbit/s tbf | {mib} MiB | {outage:g} | {t_done - t_up:.1f} | {start - t_up:.1f} | {xfer:.1f} | {total_rx / data:.3f} | {data / xfer / link * 100:.1f} % |")
EOF
  ;;
*)
  echo "usage: $0 latency [SAMPLES] [PACK_DELAY] | catchup [RATE_MBIT] [MIB] [OUTAGE_S]" >&2
  exit 2
  ;;
esac
