#!/bin/bash
# `mpc serve` under load (BENCHMARKS.md, "Private inference as a service"), all on loopback over
# mutual TLS: sessions per minute and p50/p95 client latency for 1 and 4 concurrent clients at
# sequence length 128 (one sentence pair per session, truncated to 128 tokens), peak RSS of each
# role, the cost per example at batch 1, 8 and 32 within one session, and `mpc run`'s one-shot
# path on the same example. Pause other work on the machine first. From the repo root:
#   bench/serve_load.sh EXPORT [out-dir] [sessions per concurrency level]
set -euo pipefail
cd "$(dirname "$0")/.."
EXP=${1:?usage: bench/serve_load.sh EXPORT [out-dir] [sessions]}
O=${2:-bench/serve-session}
N=${3:-16}
B=${MPCFORMER:-${CARGO_TARGET_DIR:-target}/release/mpcformer}
PORT0=${PORT0:-7300}
PORTD=$((PORT0 + 1))
mkdir -p "$O"
lscpu | grep -E 'Model name|^CPU\(s\)' > "$O/cpu.txt"
grep -o -w -E 'avx512f|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ' >> "$O/cpu.txt"
"$B" mpc certs --out "$O/certs" --force > /dev/null

# One long pair (truncated to 128 tokens), and 8 and 32 of them, as RTE-format JSONL.
python3 - "$O" <<'EOF'
import json, sys
o = sys.argv[1]
a = " ".join(["The committee approved the new budget for the coming year after a long debate."] * 12)
b = " ".join(["The budget was approved by the committee."] * 12)
for n in (1, 8, 32):
    with open(f"{o}/long{n}.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"sentence1": a, "sentence2": b, "label": 0, "idx": i}) + "\n")
EOF

/usr/bin/time -v "$B" mpc dealer --listen 127.0.0.1:$PORTD --certs "$O/certs" --max-sessions 8 \
    > "$O/dealer.log" 2> "$O/dealer.time" &
/usr/bin/time -v "$B" mpc serve --model "$EXP" --listen 127.0.0.1:$PORT0 --dealer 127.0.0.1:$PORTD \
    --certs "$O/certs" --max-sessions 4 --log-json "$O/sessions.jsonl" \
    > "$O/serve.log" 2> "$O/serve.time" &
until grep -q MPC_LISTENING "$O/serve.log" 2> /dev/null; do sleep 0.2; done

now_ms() { date +%s%3N; }
# client TAG DATA BATCH: one session; appends "TAG latency_s peak_rss_kb" to $O/clients.txt.
client() {
    local t0 t1
    t0=$(now_ms)
    /usr/bin/time -f "%M" -o "$O/$1.rss" "$B" mpc client --model "$EXP/p1" \
        --peer 127.0.0.1:$PORT0 --dealer 127.0.0.1:$PORTD --certs "$O/certs" \
        --task rte --data "$2" --batch-size "$3" --output "$O/$1.json" > /dev/null 2> "$O/$1.err"
    t1=$(now_ms)
    echo "$1 $(( t1 - t0 )) $(cat "$O/$1.rss")" >> "$O/clients.txt"
}
rm -f "$O/clients.txt"
for conc in 1 4; do
    t0=$(now_ms)
    for w in $(seq 1 $conc); do
        ( for i in $(seq 1 $((N / conc))); do client "c$conc-w$w-$i" "$O/long1.jsonl" 1; done ) &
    done
    wait $(jobs -p | tail -n $conc)
    echo "c$conc wall_ms $(( $(now_ms) - t0 ))" >> "$O/levels.txt"
done
for b in 1 8 32; do client "batch$b" "$O/long$b.jsonl" "$b"; done
kill -TERM $(pgrep -f "^$B mpc serve --model $EXP") $(pgrep -f "^$B mpc dealer --listen 127.0.0.1:$PORTD")
wait

# The one-shot path on the same example: certificates, both parties and the dealer per call.
for r in 1 2 3; do
    t0=$(now_ms)
    /usr/bin/time -f "%M" -o "$O/run$r.rss" "$B" mpc run --model "$EXP" --task rte \
        --data "$O/long1.jsonl" --output "$O/run$r.json" > "$O/run$r.log" 2>&1
    echo "run$r $(( $(now_ms) - t0 )) $(cat "$O/run$r.rss")" >> "$O/clients.txt"
done
python3 bench/serve_load_summary.py "$O"
