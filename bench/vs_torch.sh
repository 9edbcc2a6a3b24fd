#!/bin/bash
# PyTorch beside ours in one session (BENCHMARKS.md, "Performance work"): three rounds of the
# MiniLM cases, BERT-base distillation peak memory, one stage-1 epoch on RTE. Pause anything else
# running on the machine for the duration. From the repo root, after `cargo build --release`:
#   bench/vs_torch.sh [out-dir]
set -x
cd "$(dirname "$0")/.."
PY=${PYTHON:-$HOME/.cache/mpcformer-ref/torch/bin/python}
B=${MPCFORMER:-target/release/mpcformer}
O=${1:-bench/session}
mkdir -p $O
for r in 1 2 3; do
  $PY ../shared/tools/bench_torch.py --threads 2 --warmup 2 --steps 8 --cases minilm_infer_sdpa,minilm_distill,minilm_train_eager --out $O/torch-r$r.json 2>&1 | grep -E "^minilm"
  $B bench infer --steps 16 --warmup 2 --output $O/ours-infer-r$r.json 2>&1 | grep tokens_per
  $B bench distill --steps 8 --warmup 2 --output $O/ours-distill-r$r.json 2>&1 | grep tokens_per
  $B bench train --steps 6 --warmup 2 --output $O/ours-train-r$r.json 2>&1 | grep tokens_per
done
/usr/bin/time -v $B bench distill --shape bert-base --batch 32 --seq 128 --steps 1 --warmup 1 --output $O/ours-bert-base-distill-b32.json 2> $O/ours-bb-time.txt | tail -2
grep -E "Maximum resident|Elapsed" $O/ours-bb-time.txt
/usr/bin/time -v $PY -c "
import sys; sys.path.insert(0, '../shared/tools'); import torch; torch.set_num_threads(2)
import bench_torch as b; print(b.case_distill(b.BASE, 32, 128, 1, 1))" 2> $O/torch-bb-time.txt | tail -2
grep -E "Maximum resident|Elapsed" $O/torch-bb-time.txt
rm -rf checkpoints/bench-stage1-rte
/usr/bin/time -f "ours stage1 epoch wall %e s" $B run recipes/minilm.toml --set data.task=rte --set 'stages=["finetune","stage1"]' --set stage1.epochs=1 --set teacher.finetuned_run=checkpoints/minilm-rte-quad+2quad-s42 --set name=bench-stage1-rte > $O/ours-stage1.log 2>&1
tail -1 $O/ours-stage1.log
$PY bench/torch_stage1_epoch.py --teacher checkpoints/minilm-rte-quad+2quad-s42/teacher --data ../shared/data/glue/RTE/train.tsv --out $O/torch-stage1-rte.json 2>&1 | tail -3
