#!/usr/bin/env bash
# The background queue of MiniLM runs behind RESULTS.md, in order. Safe to restart at any time:
# a finished run (summary.json) is skipped, a started one continues with --resume, and each
# finished run's metrics files are copied into results/. Logs: logs/<run>.log.
#
#   scripts/minilm-queue.sh              # everything still to do
#   scripts/minilm-queue.sh rte cola     # only these tasks' lines
#
# MPCFORMER_BIN picks the binary (default: target/release/mpcformer of CARGO_TARGET_DIR).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN="${MPCFORMER_BIN:-${CARGO_TARGET_DIR:-target}/release/mpcformer}"
export HF_HUB_OFFLINE=1
M=recipes/minilm.toml
mkdir -p logs

# run NAME TASK [--set ...]: one run of recipes/minilm.toml.
run() {
    local name=$1 task=$2
    shift 2
    if [ "${#ONLY[@]}" -gt 0 ] && [[ ! " ${ONLY[*]} " =~ " $task " ]]; then return; fi
    local dir=checkpoints/$name
    if [ -f "$dir/summary.json" ]; then
        [ -f "results/$name/summary.json" ] || "$BIN" report "$dir" --save-runs results/ > /dev/null
        echo "done already: $name"
        return
    fi
    while pgrep -af mpcformer | tr ' ' '\n' | grep -qxF -- "name=$name"; do sleep 30; done
    if [ -f "$dir/summary.json" ]; then
        "$BIN" report "$dir" --save-runs results/ > /dev/null
        echo "$(date +%T) done (by an earlier queue): $name"
        return
    fi
    local resume=()
    [ -f "$dir/metrics.jsonl" ] && resume=(--resume)
    echo "$(date +%T) start: $name"
    if "$BIN" run $M --set data.task="$task" --set "name=$name" "$@" "${resume[@]}" \
        >> "logs/$name.log" 2>&1; then
        "$BIN" report "$dir" --save-runs results/ > /dev/null
        echo "$(date +%T) done: $name"
    else
        echo "$(date +%T) FAILED: $name (logs/$name.log)"
    fi
}
teacher_of() { echo "teacher.finetuned_run=checkpoints/minilm-$1-quad+2quad-s42"; }

ONLY=("$@")
# Breadth first: every task's teacher and first student, then the other two seeds, then the
# Quad+2ReLU students (all on the seed-42 teachers).
TASKS=(rte cola stsb mrpc sst2 imdb)
for task in "${TASKS[@]}"; do
    run "minilm-$task-quad+2quad-s42" $task
done
for seed in 1 2; do
    for task in "${TASKS[@]}"; do
        run "minilm-$task-quad+2quad-s$seed" $task --set seed=$seed --set "$(teacher_of $task)"
    done
done
for task in "${TASKS[@]}"; do
    run "minilm-$task-quad+2relu-s42" $task --set student.attn=2relu --set "$(teacher_of $task)"
done
