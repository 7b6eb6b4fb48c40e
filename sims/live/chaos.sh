#!/usr/bin/env bash
# Live chaos: real node processes on loopback, SIGKILLed and restarted while tasks run.
#
#   sims/live/chaos.sh [BIN] [TASKS] [SEGMENTS] [SEGMENT_MS] [EVERY] [KILLS]
#   (defaults: target/release/agentmesh 60 100 200 2 6)
#
# Starts four nodes (n0..n3, ports $PORT..$PORT+3, default 7500) with four `sleep`
# replicas each, submits TASKS tasks of SEGMENTS segments of SEGMENT_MS ms at once,
# spread over the nodes (one `agentmesh submit --json --results` each), then every EVERY
# seconds SIGKILLs a node picked at random and restarts it a second later, KILLS times
# (with STOP=S set: pauses it with SIGSTOP for S seconds instead, long enough to be held
# down and have its tasks taken over, and lets it go on; with LEAVE=1 set: stops it with
# SIGTERM, so that it drains and leaves, and restarts it a second after it exited: a
# rolling restart).
# Each task must complete with one result per segment. Prints the kills, the attempts
# run again and the duplicates discarded over all outcomes, and "ok N bad M"; exits 1
# if any task did not complete. Needs python3. Nodes use the
# development CA in $AGENTMESH_DEV_CA_DIR (default: a folder under the run's own).
set -u
BIN=${1:-target/release/agentmesh}
TASKS=${2:-60}
SEGS=${3:-100}
MS=${4:-200}
EVERY=${5:-2}
KILLS=${6:-6}
PORT=${PORT:-7500}
D=$(mktemp -d "${TMPDIR:-/tmp}/agentmesh-chaos.XXXXXX")
export AGENTMESH_DEV_CA_DIR=${AGENTMESH_DEV_CA_DIR:-$D/ca}

start() {
    "$BIN" node --name "n$1" --listen "127.0.0.1:$((PORT + $1))" --join "127.0.0.1:$PORT" \
        --agents sleep=4 >> "$D/n$1.log" 2>&1 &
    echo $! > "$D/n$1.pid"
    disown # no "Killed" notices from bash
}
stop_all() {
    for i in 0 1 2 3; do
        kill -CONT "$(cat "$D/n$i.pid" 2>/dev/null)" 2>/dev/null
        kill -9 "$(cat "$D/n$i.pid" 2>/dev/null)" 2>/dev/null
    done
}
trap stop_all EXIT

for i in 0 1 2 3; do start "$i"; sleep 0.3; done
sleep 3
submits=()
for t in $(seq 1 "$TASKS"); do
    "$BIN" submit --to "127.0.0.1:$((PORT + t % 4))" --capability sleep --segments "$SEGS" \
        --segment-ms "$MS" --json --results > "$D/t$t.json" 2> "$D/t$t.err" &
    submits+=($!)
done
for k in $(seq 1 "$KILLS"); do
    sleep "$EVERY"
    v=$((RANDOM % 4))
    if [ -n "${STOP:-}" ]; then
        kill -STOP "$(cat "$D/n$v.pid")"
        echo "pause $k: n$v for ${STOP} s at $(date +%T.%N)" | tee -a "$D/kills"
        sleep "$STOP"
        kill -CONT "$(cat "$D/n$v.pid")"
        continue
    fi
    pid=$(cat "$D/n$v.pid")
    if [ -n "${LEAVE:-}" ]; then
        kill -TERM "$pid" 2>/dev/null
        echo "stop $k: n$v at $(date +%T.%N)" | tee -a "$D/kills"
        # It drains first (up to 20 s); the next one may take its port only once it exited.
        for _ in $(seq 1 300); do
            case "$(ps -o stat= -p "$pid" 2>/dev/null)" in
                "" | Z*) break ;;
            esac
            sleep 0.1
        done
    else
        kill -9 "$pid" 2>/dev/null
        echo "kill $k: n$v at $(date +%T.%N)" | tee -a "$D/kills"
    fi
    sleep 1
    start "$v"
done
for p in "${submits[@]}"; do wait "$p"; done

ok=0
bad=0
for t in $(seq 1 "$TASKS"); do
    if python3 - "$D/t$t.json" "$SEGS" <<'PY'
import json, sys
try:
    o = json.load(open(sys.argv[1]))
except Exception:
    sys.exit(1)
segments = int(sys.argv[2])
results = o.get("results") or []
sys.exit(0 if o.get("status") == "completed" and o.get("completed") == segments
         and len(results) == segments else 1)
PY
    then
        ok=$((ok + 1))
    else
        bad=$((bad + 1))
        echo "task $t: $(head -c 300 "$D/t$t.json") $(tail -c 300 "$D/t$t.err")"
    fi
done
python3 - "$D" "$TASKS" <<'PY'
import json, sys
again = dups = 0
for t in range(1, int(sys.argv[2]) + 1):
    try:
        o = json.load(open(f"{sys.argv[1]}/t{t}.json"))
    except Exception:
        continue
    again += o.get("reallocated", 0)
    dups += o.get("duplicates_discarded", 0)
print(f"reallocated {again} duplicates_discarded {dups}")
PY
echo "ok $ok bad $bad (logs in $D)"
[ "$bad" -eq 0 ]
