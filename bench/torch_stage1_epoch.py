#!/usr/bin/env python3
"""One epoch of MPCFormer stage-1 distillation in PyTorch, timed: the reference's way of feeding data.

What `mpcformer run recipes/minilm.toml --set data.task=rte` does in its stage 1, done as the
reference scripts do it: every example padded to max length 128 (`convert_examples_to_features`),
batch 32, shuffled; teacher = a fine-tuned HF checkpoint (exact, eval mode, no grad), student =
the same weights with Quad GeLU + 2Quad attention (train mode, dropout 0.1); loss = Σ MSE of
attention scores (masked as TinyBERT: scores ≤ −100 zeroed after adding the −10000 mask) + Σ MSE
of hidden states (embedding output included), layer map k = 1; AdamW at 5e-5 (the reference uses
BertAdam; the optimiser's cost is the same elementwise work).

Usage (venv from ../shared/tools/setup.sh):
  python bench/torch_stage1_epoch.py --teacher checkpoints/<run>/teacher \
      --data ../shared/data/glue/RTE/train.tsv --out bench/torch-stage1-rte.json [--threads 2]
"""
import argparse
import csv
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, BertForSequenceClassification

SHARED = os.environ.get("MPCFORMER_SHARED", os.path.join(os.path.dirname(__file__), "..", "..", "shared"))
sys.path.insert(0, os.path.join(SHARED, "tools"))
import gen_tiny_fixtures as gtf  # noqa: E402  (patches HF eager attention: Quad, 2Quad, score capture)


def read_rte(path):
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    head = rows[0]
    a, b = head.index("sentence1"), head.index("sentence2")
    return [(r[a], r[b]) for r in rows[1:]]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--max-steps", type=int, default=0, help="stop early (0 = whole epoch)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    tok = AutoTokenizer.from_pretrained(a.teacher)
    pairs = read_rte(a.data)
    enc = tok([p[0] for p in pairs], [p[1] for p in pairs], padding="max_length",
              truncation=True, max_length=a.max_len, return_tensors="pt")

    teacher = BertForSequenceClassification.from_pretrained(a.teacher, attn_implementation="eager")
    student = BertForSequenceClassification.from_pretrained(a.teacher, attn_implementation="eager")
    gtf.set_variant(teacher, "exact")
    gtf.set_variant(student, "quad_2quad")
    teacher.eval()
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=5e-5)

    n = len(pairs)
    order = torch.randperm(n)
    steps = n // a.batch
    if a.max_steps:
        steps = min(steps, a.max_steps)
    t0 = time.perf_counter()
    for s in range(steps):
        idx = order[s * a.batch:(s + 1) * a.batch]
        ids, am, tt = enc["input_ids"][idx], enc["attention_mask"][idx], enc["token_type_ids"][idx]
        gtf._STATE["scores"] = []
        with torch.no_grad():
            t = teacher(input_ids=ids, attention_mask=am, token_type_ids=tt, output_hidden_states=True)
        t_scores = gtf._STATE["scores"]
        gtf._STATE["scores"] = []
        out = student(input_ids=ids, attention_mask=am, token_type_ids=tt, output_hidden_states=True)
        s_scores = gtf._STATE["scores"]
        add = (1.0 - am[:, None, None, :].float()) * -10000.0
        loss = 0.0
        for ss, ts in zip(s_scores, t_scores):
            ss, ts = ss + add, ts + add
            ss = torch.where(ss <= -1e2, torch.zeros_like(ss), ss)
            ts = torch.where(ts <= -1e2, torch.zeros_like(ts), ts)
            loss = loss + F.mse_loss(ss, ts)
        for hs, ht in zip(out.hidden_states, t.hidden_states):
            loss = loss + F.mse_loss(hs, ht)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if s % 10 == 0:
            print(f"step {s}/{steps} loss {loss.item():.4f} {time.perf_counter() - t0:.1f}s", flush=True)
    wall = time.perf_counter() - t0
    res = {"case": "stage1_epoch", "task": "rte", "examples": steps * a.batch, "steps": steps,
           "batch": a.batch, "max_len": a.max_len, "padded_tokens": steps * a.batch * a.max_len,
           "wall_s": wall, "threads": a.threads, "torch": torch.__version__}
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
