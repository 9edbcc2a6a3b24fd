#!/usr/bin/env bash
# The background queue of MiniLM runs behind RESULTS.md, in order (recipes/minilm.toml). Safe to restart at any time:
# a run recorded in results/ is skipped, a started one continues with --resume, and each
# finished run's metrics files are copied into results/. Logs: logs/<run>.log.
#
#   scripts/minilm-queue.sh              # everything still to do
#   scripts/minilm-queue.sh rte cola     # only these tasks' lines
#
# Run directories need not outlive a session (on the project's machines only the git tree does):
# a run that needs a seed-42 teacher which is gone remakes it first from its sweep's record
# (teacher.sweep_from = results/<run>: only the best learning rate is fine-tuned again, and the
# log says whether it reproduced the recorded dev score).
# `mpcformer run` locks its run directory, so a second queue (or a run by hand) on the same run
# fails at once instead of interleaving checkpoints; its line then says FAILED.
# MPCFORMER_BIN picks the binary (default: target/release/mpcformer of CARGO_TARGET_DIR).
# MPCFORMER_QUEUE_RUNS=N stops the queue before it starts its (N+1)-th run, so that a slot (a
# core, the time left in a session) goes to the next N runs of the listed tasks alone.
# MPCFORMER_RUNS picks where run directories live (default: checkpoints).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN="${MPCFORMER_BIN:-${CARGO_TARGET_DIR:-target}/release/mpcformer}"
export HF_HUB_OFFLINE=1
M=recipes/minilm.toml
RUNS="${MPCFORMER_RUNS:-checkpoints}"
mkdir -p logs "$RUNS"

# run NAME TASK [--set ...]: one run of recipes/minilm.toml.
run() {
    local name=$1 task=$2
    shift 2
    if [ "${#ONLY[@]}" -gt 0 ] && [[ ! " ${ONLY[*]} " =~ " $task " ]]; then return; fi
    local dir=$RUNS/$name
    if [ -f "results/$name/summary.json" ]; then
        echo "done already: $name"
        return
    fi
    if [ -f "$dir/summary.json" ]; then
        compare_run "$dir" "$task"
        "$BIN" report "$dir" --save-runs results/ > /dev/null
        echo "done already: $name (now in results/)"
        return
    fi
    may_start || exit 0
    local arg
    for arg in "$@"; do
        if [[ $arg == teacher.finetuned_run=* ]]; then
            remake_teacher "$task" || return
        fi
    done
    local resume=()
    [ -f "$dir/metrics.jsonl" ] && resume=(--resume)
    echo "$(date +%T) start: $name"
    if "$BIN" run $M --set data.task="$task" --set "name=$name" --set "output_dir=$RUNS" "$@" "${resume[@]}" \
        >> "logs/$name.log" 2>&1; then
        compare_run "$dir" "$task"
        "$BIN" report "$dir" --save-runs results/ > /dev/null
        echo "$(date +%T) done: $name"
    else
        echo "$(date +%T) FAILED: $name (logs/$name.log)"
    fi
}
# may_start: whether MPCFORMER_QUEUE_RUNS allows one more run to start (and counts it).
STARTED=0
may_start() {
    if [ -n "${MPCFORMER_QUEUE_RUNS:-}" ] && [ "$STARTED" -ge "$MPCFORMER_QUEUE_RUNS" ]; then
        echo "$(date +%T) stopping: MPCFORMER_QUEUE_RUNS=$MPCFORMER_QUEUE_RUNS runs started"
        return 1
    fi
    STARTED=$((STARTED + 1))
}
# compare_run DIR TASK: where the run's student parts from its teacher on dev
# (teacher-comparison.json, which --save-runs copies into results/). IMDb's runs score 1,000
# test reviews drawn by data.eval_sample, and `compare --sample 1000` draws the same.
compare_run() {
    local dir=$1 task=$2 data=(--data ../shared/data/glue)
    [ ! -d "$dir/student" ] || [ -f "$dir/teacher-comparison.json" ] && return 0
    [ "$task" = imdb ] && data=(--data ../shared/data/imdb --split test --sample 1000 --batch-size 16)
    "$BIN" compare --teacher "$dir/teacher" --model "$dir/student" --task "$task" \
        "${data[@]}" --output "$dir/teacher-comparison.json" \
        >> "logs/$(basename "$dir").log" 2>&1 ||
        echo "$(date +%T) FAILED: comparing $(basename "$dir") with its teacher (logs/$(basename "$dir").log)"
}
# remake_teacher TASK: the seed-42 run's teacher, from the sweep recorded in results/ when its
# run directory is gone. Not copied to results/: the recorded run stays as it ran.
remake_teacher() {
    local task=$1 name
    name=$(teacher_run "$1")
    local dir=$RUNS/$name
    [ -f "$dir/teacher/model.safetensors" ] && [ -f "$dir/summary.json" ] && return 0
    local resume=()
    [ -f "$dir/metrics.jsonl" ] && resume=(--resume)
    echo "$(date +%T) start: $name teacher (from results/$name)"
    if ! "$BIN" run $M --set data.task="$task" --set "name=$name" --set "output_dir=$RUNS" \
        --set 'stages=["finetune"]' --set "teacher.sweep_from=results/$name" "${resume[@]}" \
        >> "logs/$name-teacher.log" 2>&1; then
        echo "$(date +%T) FAILED: $name teacher (logs/$name-teacher.log)"
        return 1
    fi
    if grep -q '"sweep_reproduced":true' "$dir/metrics.jsonl"; then
        echo "$(date +%T) done: $name teacher (reproduced its recorded dev score)"
    else
        echo "$(date +%T) done: $name teacher, NOT the recorded one (the whole sweep ran again)"
    fi
}
# The run that fine-tuned each task's teacher: the seed-42 run of MPCFormer's start where that
# came first; for SST-2 and IMDb a run of the teacher's sweep alone (stages = ["finetune"]),
# recorded in results/ as soon as it ends, so that the hour it takes survives a session that
# ends before the students do.
teacher_run() {
    case $1 in
        sst2 | imdb) echo "minilm-$1-teacher-s42" ;;
        *) echo "minilm-$1-quad+2quad-s42" ;;
    esac
}
teacher_of() { echo "teacher.finetuned_run=$RUNS/$(teacher_run "$1")"; }
# stage1_of TASK SEED: the shipped recipe's finished run of that seed, whose stage 1 a variant
# that differs in stage 2 alone takes (student.stage1_run) instead of running it again; nothing,
# so that the variant runs its own, when that run's directory is gone.
stage1_of() { stage1_in "minilm-$1-quad+2quad-fitted-s$2"; }
# stage1_in RUN: the same from a named run (another variant in stage 2 alone of that seed).
stage1_in() {
    local dir=$RUNS/$1
    [ -f "$dir/summary.json" ] && echo "--set student.stage1_run=$dir"
}
# reseeded_teacher TASK SEED: the seed-42 teacher's fine-tuning again, at its chosen learning
# rate, with another seed; then how often the two teachers agree on dev
# (results/<teacher's run>/reseeded-teacher-s<seed>.json, `mpcformer compare`'s output, which
# `mpcformer report` reads). That is the agreement to expect of a model that learned the task
# from the same data, against which a student's is read.
reseeded_teacher() {
    local task=$1 seed=$2 lr
    if [ "${#ONLY[@]}" -gt 0 ] && [[ ! " ${ONLY[*]} " =~ " $task " ]]; then return; fi
    local name="minilm-$task-teacher-s$seed" first
    first=$RUNS/$(teacher_run "$task")
    local out="results/$(teacher_run "$task")/reseeded-teacher-s$seed.json"
    if [ -f "$out" ]; then
        echo "done already: $name"
        return
    fi
    remake_teacher "$task" || return
    lr=$(python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); p=s["teacher"]["primary"]; print(next(g["lr"] for g in s["teacher_grid"] if g["primary"] == p))' \
        "results/$(teacher_run "$task")/summary.json") || return
    local resume=()
    [ -f "$RUNS/$name/metrics.jsonl" ] && resume=(--resume)
    may_start || exit 0
    echo "$(date +%T) start: $name (lr $lr)"
    if "$BIN" run $M --set data.task="$task" --set "name=$name" --set "output_dir=$RUNS" --set seed="$seed" \
        --set 'stages=["finetune"]' --set "finetune.lr_grid=[$lr]" "${resume[@]}" >> "logs/$name.log" 2>&1 &&
        "$BIN" compare --teacher "$first/teacher" --model "$RUNS/$name/teacher" --task "$task" \
            --data ../shared/data/glue --output "$out.new" >> "logs/$name.log" 2>&1 &&
        mv "$out.new" "$out"; then
        echo "$(date +%T) done: $name"
    else
        echo "$(date +%T) FAILED: $name (logs/$name.log)"
    fi
}

ONLY=("$@")
# Stage 2 of the shipped recipe adds the gold labels' cross-entropy to the teacher's outputs on
# the classification tasks (stage2.label_weight = 1); the runs without it keep the label
# "stage 2 on the teacher alone" (NOLABELS), and so do the levers measured before.
NOLABELS=(--set stage2.label_weight=0)
# MPCFormer's start (the teacher's weights with the approximations switched on, stage 1 on
# scores, stage 2 on the teacher alone): the shipped recipe until the fitted start replaced it,
# and a labelled row since.
OLD=(--set student.init=teacher --set stage1.attention_target=scores "${NOLABELS[@]}")
OLD_LABEL="MPCFormer's start"
# Levers, each its own labelled row on the seed-42 teacher (RESULTS.md, "What each lever was
# worth"): stage 1 with linear decay, and transfer data at the same stage-1 compute (6 epochs'
# worth of examples). The attention target (KL of distributions instead of the reference's
# score MSE) was measured on MPCFormer's start, and is the shipped recipe's since.
# No run for 2Quad's shift c: (α·s + c)² ∝ (s + c/α)², so each head's query scale already sets
# its own shift, and the fitted start picks it.
levers() {
    local task=$1 transfer=$2 epochs=$3
    shift 3
    local t
    t=$(teacher_of "$task")
    run "minilm-$task-quad+2quad-probs-s42" "$task" --set "$t" "${OLD[@]}" \
        --set stage1.attention_target=probs --set "label=$OLD_LABEL, stage 1 attention probabilities (KL)"
    run "minilm-$task-quad+2quad-linear-s42" "$task" --set "$t" \
        --set stage1.schedule=linear --set stage1.warmup=0.1 --set 'label=stage 1 linear decay'
    run "minilm-$task-quad+2quad-transfer-s42" "$task" --set "$t" \
        --set data.transfer_examples="$transfer" --set stage1.epochs="$epochs" "$@" \
        --set "label=transfer data, same stage-1 compute"
}
# TinyBERT's data augmentation at the shipped recipe's compute: 5 neighbour-word copies of each
# training example, in both stages, for 1 epoch each (instead of 6 + 5 epochs of the training set
# alone). The copies have no gold label: stage 2 fits the teacher alone (STS-B: its scores).
augmented() {
    local task=$1 copies=$2
    shift 2
    run "minilm-$task-quad+2quad-neighbours-s42" "$task" --set "$(teacher_of "$task")" \
        --set data.transfer_examples="$copies" --set data.transfer_kind=neighbours \
        --set 'data.transfer_stages=["stage1", "stage2"]' "${NOLABELS[@]}" \
        --set stage1.epochs=1 --set stage2.epochs=1 \
        --set 'label=neighbour copies in both stages, same compute' "$@"
}
# The shipped recipe on the task's seed-42 teacher; fitted TASK SEED [SUFFIX LABEL [--set ...]]
# for a labelled variant.
fitted() {
    local task=$1 seed=$2 suffix=${3:-} label=${4:-}
    local name="minilm-$task-quad+2quad-fitted$suffix-s$seed" args=()
    [ "$name" != "$(teacher_run "$task")" ] && args+=(--set "$(teacher_of "$task")")
    [ -n "$label" ] && args+=(--set "label=$label")
    run "$name" "$task" --set seed="$seed" "${args[@]}" "${@:5}"
}
# fitted_teacher_only TASK SEED: the shipped recipe with stage 2 on the teacher alone.
fitted_teacher_only() {
    fitted "$1" "$2" -teacher-only "stage 2 on the teacher alone" "${NOLABELS[@]}"
}
# Cheap tasks first: every one's teacher and first student (MPCFormer's start, which came
# first), the augmentation, the fitted start and its seeds, the levers; SST-2 and IMDb (hours
# each) after.
for task in rte cola stsb mrpc; do
    run "minilm-$task-quad+2quad-s42" $task "${OLD[@]}" --set "label=$OLD_LABEL"
done
augmented cola 42755 "${OLD[@]}" --set "label=$OLD_LABEL, neighbour copies in both stages, same compute"
augmented stsb 28745 "${OLD[@]}" --set stage2.regression_target=teacher \
    --set "label=$OLD_LABEL, neighbour copies in both stages, same compute, stage 2 on the teacher's scores"
# The fitted start on the teacher alone, as first run: before any training it took the CoLA
# student's agreement with its teacher from 14.8 % to 87.3 % (docs/src/distill.md).
fitted_teacher_only cola 42
fitted_teacher_only rte 42
fitted_teacher_only cola 1
fitted stsb 42
fitted_teacher_only mrpc 42
fitted_teacher_only cola 2
# How often a reseeded teacher agrees with the first: what a student's agreement is read against
# (cheap where the teacher is: minutes each).
reseeded_teacher cola 1
reseeded_teacher mrpc 1
fitted_teacher_only rte 1
fitted_teacher_only rte 2
fitted rte 42 -logit-mse "stage 2 on the teacher alone, on logit MSE" --set stage2.logit_loss=mse "${NOLABELS[@]}"
reseeded_teacher rte 1
# RTE's students part from their teacher blind to the right answer, where a second teacher
# trained on the labels leans to it: stage 2 with the gold labels beside the teacher's outputs.
# It moved RTE from 160, 160, 161 of 277 to 164, 160, 164, MRPC's F1 from 86.2 to 86.7 and
# CoLA's MCC from 27.8 to 28.5, and is the shipped recipe since. Variants that differ in stage 2
# alone take their seed's stage 1 from a finished run of it.
fitted rte 42
for seed in 1 2; do
    fitted rte $seed "" "" $(stage1_in "minilm-rte-quad+2quad-fitted-teacher-only-s$seed")
done
run "minilm-rte-quad+2quad-stage2-lr5e-5-s42" rte --set "$(teacher_of rte)" "${NOLABELS[@]}" \
    --set stage2.lr=5e-5 --set 'label=stage 2 on the teacher alone, lr 5e-5' $(stage1_of rte 42)
fitted mrpc 42 "" "" $(stage1_in minilm-mrpc-quad+2quad-fitted-teacher-only-s42)
fitted cola 1 "" "" $(stage1_in minilm-cola-quad+2quad-fitted-teacher-only-s1)
fitted stsb 1
fitted stsb 2
# Every task before more levers: SST-2 and IMDb (teacher sweep and seed 42, hours each), then
# MRPC's other seeds.
run "$(teacher_run sst2)" sst2 --set 'stages=["finetune"]'
# Stage 2 keeps its best checkpoint on dev and the teacher's learning rate is chosen on dev, as
# in the reference (RESULTS.md, "Chosen on dev"): both chosen instead on 249 training pairs held
# out of training (10 %), with the teacher of its own that this makes; dev scored once, at the end.
run "minilm-rte-quad+2quad-fitted-held-out-s42" rte --set data.select_examples=249 \
    --set 'label=chosen on 249 held-out training pairs, not on dev'
# RTE's margin, the one figure short of its bar. The gold labels beside the teacher moved it
# most (160, 160, 161 → 164, 160, 164 of 277): their weight doubled. Its students agree with the
# teacher on 90.6 % of their own training pairs: stage 2 underfits the teacher, and at 5× the
# learning rate it collapsed to the majority answer; stage 2 for 3× the epochs instead. Both
# differ from the shipped recipe in stage 2 alone and share one stage 1.
run "minilm-rte-quad+2quad-labels-x2-s42" rte --set "$(teacher_of rte)" \
    --set stage2.label_weight=2 --set 'label=stage 2 gold labels ×2' $(stage1_of rte 42)
run "minilm-rte-quad+2quad-stage2x3-s42" rte --set "$(teacher_of rte)" --set stage2.epochs=15 \
    --set 'label=stage 2 ×3' $(stage1_of rte 42 || stage1_in minilm-rte-quad+2quad-labels-x2-s42)
fitted sst2 42
# Three seeds on CoLA and MRPC (the bar's), then IMDb (teacher sweep and seed 42).
fitted cola 2 "" "" $(stage1_in minilm-cola-quad+2quad-fitted-teacher-only-s2)
fitted cola 42
for seed in 1 2; do
    fitted mrpc $seed
done
run "$(teacher_run imdb)" imdb --set 'stages=["finetune"]'
fitted imdb 42
# The loss-term scales: stage 1's attention KL is ≈ 5× its hidden-state MSE on RTE (3.1 and 0.56
# midway through seed 1's stage 1): the hidden states weighted ×5, so both terms pull alike.
run "minilm-rte-quad+2quad-hidden-x5-s42" rte --set "$(teacher_of rte)" \
    --set stage1.hidden_weight=5 --set 'label=stage 1 hidden-state term ×5'
reseeded_teacher stsb 1
# Neighbour copies narrowed STS-B's train–dev agreement gap, and RTE's is the widest
# (90.6 % / 85.9 %).
augmented rte 12450
# Quad+2ReLU on the same teachers, and SST-2's and IMDb's other seeds, before the levers.
for task in rte cola stsb mrpc; do
    run "minilm-$task-quad+2relu-fitted-s42" $task --set student.attn=2relu --set "$(teacher_of $task)"
done
# 2ReLU's weights ignore the query scale, so the fitted start left its attention as it was
# (CoLA: mean KL per layer 2.5 from the teacher's softmax, against 2Quad's fitted 0.27) and
# CoLA's student kept 87 %. The key shift (student.fit_shift) is a fit 2ReLU does have: on
# CoLA's fit examples it takes the KL to 0.32–0.66 per layer. Ran 2026-12-03: MCC 23.6 against
# 23.7 without, agreement 87.6 % against 92.0 % — no closer student; off by default.
run "minilm-cola-quad+2relu-fitted-shift-s42" cola --set student.attn=2relu \
    --set student.fit_shift=true --set "$(teacher_of cola)" --set 'label=key shift fitted'
# 2ReLU gives a key with a negative score no weight and no gradient: stage 1's attention KL
# cannot raise a key the teacher attends to once the student's score for it is below 0, while
# the reference's score MSE pulls on every score (and 2ReLU, blind to the query scale, has no
# fitted scale for it to undo). Ran 2026-12-03: MCC 24.3 against 23.7, agreement 91.2 % against
# 92.0 % — inside the seeds' spread (23.7 to 24.7); the KL stays.
run "minilm-cola-quad+2relu-fitted-scores-s42" cola --set student.attn=2relu \
    --set stage1.attention_target=scores --set "$(teacher_of cola)" \
    --set 'label=stage 1 on attention scores (MSE)'
# Stage 1 joined with stage 2's logit term: where 2ReLU cannot match the teacher's attention
# (its stage-1 attention loss stays near 1.3 on CoLA, 2Quad's 0.6), stage 1 also fits the
# output the student serves. Ran 2026-12-04: MCC 24.6 against 23.7, agreement 91.9 % against
# 92.0 %; stage 1's losses and its own MCC as without it — inside the seeds' spread.
run "minilm-cola-quad+2relu-joint-s42" cola --set student.attn=2relu \
    --set stage1.prediction_weight=1 --set "$(teacher_of cola)" \
    --set 'label=stage 1 joined with the logit term'
# Twice stage 1's epochs: 2ReLU's attention loss on CoLA still fell in its sixth epoch (1.34 to
# 1.30), and the reference spends 50. Ran 2026-12-04: seed 42 MCC 25.7 against 23.7 (94.5 %),
# seed 1 25.3 against 24.7 (93.2 %), seed 2 24.1 against 24.3 (88.5 %) — 92.1 % over three
# seeds against 89.2 %, gains inside the seeds' spread; the recipe keeps 6.
for seed in 42 1 2; do
    run "minilm-cola-quad+2relu-fitted-s1x12-s$seed" cola --set student.attn=2relu --set seed=$seed \
        --set stage1.epochs=12 --set "$(teacher_of cola)" --set 'label=12 stage-1 epochs'
done
for task in sst2 imdb; do
    for seed in 1 2; do
        fitted $task $seed
    done
done
# Quad+2ReLU's other seeds, on the cheap tasks first.
for seed in 1 2; do
    for task in rte cola stsb mrpc; do
        run "minilm-$task-quad+2relu-fitted-s$seed" $task --set student.attn=2relu --set seed=$seed \
            --set "$(teacher_of $task)"
    done
done
# A student that starts at the teacher may need fewer stage-1 epochs: time-to-student.
fitted cola 42 -s1x2 "2 stage-1 epochs" --set stage1.epochs=2
fitted rte 42 -s1x2 "2 stage-1 epochs" --set stage1.epochs=2
# 2 stage-1 epochs instead of 6 cost RTE 8 of 277 pairs (156 against 164): the later epochs
# still move it, so twice the shipped 6, the issue's "stage-1 epochs per task" lever.
fitted rte 42 -s1x12 "12 stage-1 epochs" --set stage1.epochs=12
# Ran 2026-12-03: 167 of 277, the teacher's own score, agreeing on 89.2 % of dev against 86.6 %
# at 6 epochs; its other seeds scored 162 and 162 (6 epochs: 160, 164), agreeing less often —
# seed 42's gain was dev's noise, and the recipe keeps 6.
for seed in 1 2; do
    fitted rte $seed -s1x12 "12 stage-1 epochs" --set stage1.epochs=12
done
# Stage 2 at 5× the learning rate is not run on CoLA: on RTE's seed 42 it collapsed the student
# to the majority answer (52.7), and on the 2 + 2 recipe it moved CoLA's MCC from 11.9 to 10.7.
# CoLA: stage 1 joined with stage 2's logit term, so stage 1 fits the output it serves.
run "minilm-cola-quad+2quad-joint-s42" cola --set "$(teacher_of cola)" \
    --set stage1.prediction_weight=1 --set 'label=stage 1 joined with the logit term'
# STS-B: stage 2 on the teacher's scores alone (half of the neighbour run's change).
run "minilm-stsb-quad+2quad-teacher-target-s42" stsb --set "$(teacher_of stsb)" \
    --set stage2.regression_target=teacher --set "label=stage 2 on the teacher's scores" $(stage1_of stsb 42)
# Which approximation costs CoLA its accuracy: each alone, same teacher and schedule.
run "minilm-cola-gelu+2quad-fitted-s42" cola --set "$(teacher_of cola)" --set student.act=gelu \
    --set 'label=GeLU kept (2Quad alone)'
run "minilm-cola-quad+softmax-fitted-s42" cola --set "$(teacher_of cola)" --set student.attn=softmax \
    --set 'label=softmax kept (Quad alone)'
levers rte 12450 1.0
# The loss-term scales per layer: each layer's hidden-state MSE over the teacher's mean square
# there. MiniLM's output LayerNorms (γ² + β², 0.38 to 0.52 by layer) predict little reweighting
# between layers and the hidden term ≈ 2.3× as a whole, which ×5 did not help on RTE.
run "minilm-rte-quad+2quad-hidden-norm-s42" rte --set "$(teacher_of rte)" \
    --set stage1.hidden_norm=layer --set 'label=stage 1 hidden states normalised per layer'
# 2Quad's shift c where nothing absorbs it: on MPCFormer's start the query scale stays 1, so
# c = 3, the shift RTE's fitted start settles on (5 over its heads' geometric-mean α, 1.54),
# against the reference's 5.
run "minilm-rte-quad+2quad-c3-s42" rte --set "$(teacher_of rte)" "${OLD[@]}" \
    --set student.two_quad_c=3 --set "label=$OLD_LABEL, 2Quad c = 3"
levers cola 42755 1.0 --set 'data.transfer_from=["sst2", "imdb=../shared/data/imdb"]'
for task in sst2 imdb; do
    for seed in 42 1 2; do
        run "minilm-$task-quad+2relu-fitted-s$seed" $task --set student.attn=2relu --set seed=$seed \
            --set "$(teacher_of $task)"
    done
done
for seed in 1 2; do
    for task in rte cola stsb mrpc; do
        run "minilm-$task-quad+2quad-s$seed" $task --set seed=$seed "${OLD[@]}" \
            --set "label=$OLD_LABEL" --set "$(teacher_of $task)"
    done
done
for task in sst2 imdb; do
    for seed in 42 1 2; do
        run "minilm-$task-quad+2quad-s$seed" $task --set seed=$seed "${OLD[@]}" \
            --set "label=$OLD_LABEL" --set "$(teacher_of $task)"
    done
done
