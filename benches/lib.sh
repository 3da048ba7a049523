# Sourced by the benchmark scripts (compare.sh, restore.sh): a work folder
# removed on exit, free ports, and the Ferry stack on 127.0.0.1.
# The caller sets B (the release binaries) and MOSQ (the mosquitto binary).

# ferry_workdir NAME: W=/tmp/ferry-NAME-XXXX; every pid in `pids` is killed on exit.
ferry_workdir() {
  W=$(mktemp -d "/tmp/ferry-$1-XXXX")
  pids=()
  trap ferry_cleanup EXIT
}
ferry_cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$W"
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# ferry_stack [PACK_MAX_DELAY]: Mosquitto on $MP, cloud-sink on $SP ($SINK_PID),
# an aggregator between them, and a tenant key in $W/tenant.key.
ferry_stack() {
  MP=$(free_port); SP=$(free_port)
  printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_packet_size 8455168\n' "$MP" > "$W/m.conf"
  "$MOSQ" -c "$W/m.conf" 2>"$W/mosquitto.log" & pids+=($!)
  "$B/cloud-sink" serve --data "$W/cloud" --listen "127.0.0.1:$SP" 2>"$W/sink.log" & SINK_PID=$!; pids+=($!)
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$SP/v1/health" >/dev/null 2>&1 && break; sleep 0.1; done
  "$B/aggregator" run --broker "mqtt://127.0.0.1:$MP" --sink "http://127.0.0.1:$SP" --data "$W/region" \
    --pack-max-delay "${1:-200ms}" 2>"$W/agg.log" & pids+=($!)
  "$B/edge-agent" keygen --out "$W/tenant.key" 2>/dev/null
}
