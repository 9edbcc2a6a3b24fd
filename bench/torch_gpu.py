#!/usr/bin/env python3
"""PyTorch on a GPU beside `mpcformer bench --device cuda|wgpu`: the same three cases.

The cases are shared/tools/bench_torch.py's (HF BertForSequenceClassification, random init, its
model and batch builders and its Quad/2Quad patch of HF attention), moved to a device and timed
with a device synchronisation around every step, so the numbers compare with `mpcformer bench`
(which syncs the device at the end of each step too):

  distill  teacher (exact, no grad) + student (Quad GeLU + 2Quad), loss = sum of hidden-state MSEs
           + soft CE (T=1), AdamW on the student        (bench_torch.py's minilm_distill)
  train    forward + backward + AdamW step, cross-entropy (bench_torch.py's *_train_*)
  infer    forward under inference_mode                    (bench_torch.py's *_infer_*)

at MiniLM (6x384, ffn 1536) and BERT-base (12x768, ffn 3072) shapes; batch 32, seq 128 by default.
train and infer run once per --attn implementation (sdpa and eager by default; distill is eager
only, as the 2Quad patch replaces eager attention). float32 throughout, TF32 matmuls off unless
--tf32 (PyTorch's own default), so the arithmetic matches our f32 backends.

Writes one JSON file: versions, the GPU, and per case {status, median_s, tokens_per_s, all_s, ...}
or {status: "failed", error}. A case that fails does not stop the others; the exit status is 1 if
any case failed. Without CUDA (no torch.cuda device), and --device cuda, it prints why, writes
{status: "skipped", reason} and exits 0 (with --require-cuda: status "failed", exit 1); --device cpu runs the same cases on the CPU (slow: use
--steps 1 --warmup 0 --shapes minilm --batch 2 to test the script).

bench_torch.py and gen_tiny_fixtures.py are looked up in --tools, then $MPCFORMER_SHARED/tools,
../shared/tools beside the repository, and bench/gpu-bin/tools (where bench/build-gpu-bin.sh
copies them, because shared/ does not travel to the device machine).

Usage: python3 bench/torch_gpu.py --out torch-gpu.json [--device cuda] [--shapes minilm,bert-base]
           [--cases distill,train,infer] [--attn sdpa,eager] [--batch 32] [--seq 128]
           [--warmup 3] [--steps 10] [--tf32] [--tools DIR] [--require-cuda]
"""
import argparse
import json
import os
import statistics
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tools_dirs(explicit):
    dirs = []
    if explicit:
        dirs.append(explicit)
    if os.environ.get("MPCFORMER_SHARED"):
        dirs.append(os.path.join(os.environ["MPCFORMER_SHARED"], "tools"))
    dirs.append(os.path.join(REPO, "..", "shared", "tools"))
    dirs.append(os.path.join(REPO, "bench", "gpu-bin", "tools"))
    return dirs


def write(path, res):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, path)


def skip(path, res, reason, required):
    """No usable device: not an error of this script, so exit 0 with the reason on record --
    unless the caller knows there is a GPU (--require-cuda, as bench/gpu.sh passes), where it is."""
    status = "failed" if required else "skipped"
    print(f"torch_gpu.py: {status}: {reason}", file=sys.stderr)
    res["status"] = status
    res["reason"] = reason
    write(path, res)
    sys.exit(1 if required else 0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--shapes", default="minilm,bert-base")
    ap.add_argument("--cases", default="distill,train,infer")
    ap.add_argument("--attn", default="sdpa,eager", help="attention implementations for train/infer")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (off by default)")
    ap.add_argument("--tools", help="folder holding bench_torch.py and gen_tiny_fixtures.py")
    ap.add_argument("--require-cuda", action="store_true",
                    help="no torch or no CUDA device is a failure (exit 1), not a skip")
    a = ap.parse_args()

    res = {"script": "bench/torch_gpu.py", "device": a.device, "batch": a.batch, "seq": a.seq,
           "warmup": a.warmup, "steps": a.steps, "tf32": a.tf32, "cases": {}}
    try:
        import torch
    except ImportError as e:
        skip(a.out, res, f"PyTorch is not installed for {sys.executable} ({e})", a.require_cuda)
    res["torch"] = torch.__version__
    if a.device == "cuda" and not torch.cuda.is_available():
        skip(a.out, res, f"torch {torch.__version__} sees no CUDA device "
             f"(built for CUDA {torch.version.cuda}; is there an NVIDIA GPU and driver?)", a.require_cuda)

    for d in tools_dirs(a.tools):
        if os.path.exists(os.path.join(d, "bench_torch.py")):
            sys.path.insert(0, os.path.abspath(d))
            res["tools"] = os.path.abspath(d)
            break
    else:
        # A real setup error, not a missing device: fail loudly.
        sys.exit("torch_gpu.py: bench_torch.py not found in any of " + ", ".join(tools_dirs(a.tools))
                 + " (run bench/build-gpu-bin.sh, or pass --tools)")
    import torch.nn.functional as F
    import transformers
    import bench_torch as bt  # also imports gen_tiny_fixtures, which patches HF eager attention

    gtf = bt.gtf
    res["transformers"] = transformers.__version__
    dev = torch.device(a.device)
    torch.backends.cuda.matmul.allow_tf32 = a.tf32
    torch.backends.cudnn.allow_tf32 = a.tf32
    if a.device == "cuda":
        p = torch.cuda.get_device_properties(dev)
        res["gpu"] = {"name": p.name, "memory_bytes": p.total_memory,
                      "capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count}
        res["cuda"] = torch.version.cuda

    def sync():
        if a.device == "cuda":
            torch.cuda.synchronize()

    def timeit(step):
        for _ in range(a.warmup):
            step()
        sync()
        ts = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            step()
            sync()
            ts.append(time.perf_counter() - t0)
        return ts

    def batch_on(shape):
        return [t.to(dev) for t in bt.batch(a.batch, a.seq, shape["vocab_size"])]

    def train(shape, attn):
        m = bt.model_of(shape, attn).to(dev)
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
        ids, am, tt, labels = batch_on(shape)

        def step():
            opt.zero_grad(set_to_none=True)
            out = m(input_ids=ids, attention_mask=am, token_type_ids=tt, labels=labels)
            out.loss.backward()
            opt.step()
        return timeit(step)

    def infer(shape, attn):
        m = bt.model_of(shape, attn).to(dev)
        m.eval()
        ids, am, tt, _ = batch_on(shape)

        def step():
            with torch.inference_mode():
                m(input_ids=ids, attention_mask=am, token_type_ids=tt)
        return timeit(step)

    def distill(shape, _attn):
        # bench_torch.case_distill, on `dev`.
        teacher = bt.model_of(shape, "eager", seed=1).to(dev)
        teacher.eval()
        student = bt.model_of(shape, "eager", seed=2).to(dev)
        gtf.set_variant(teacher, "exact")
        gtf.set_variant(student, "quad_2quad")
        student.train()
        opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
        ids, am, tt, _ = batch_on(shape)

        def step():
            with torch.no_grad():
                t = teacher(input_ids=ids, attention_mask=am, token_type_ids=tt, output_hidden_states=True)
            opt.zero_grad(set_to_none=True)
            s = student(input_ids=ids, attention_mask=am, token_type_ids=tt, output_hidden_states=True)
            loss = sum(F.mse_loss(x, y) for x, y in zip(s.hidden_states, t.hidden_states))
            loss = loss + bt.soft_ce(s.logits, t.logits, 1.0)
            loss.backward()
            opt.step()
        return timeit(step)

    shapes = {"minilm": bt.MINILM, "bert-base": bt.BASE}
    runs = {"distill": distill, "train": train, "infer": infer}
    failed = 0
    for shape_name in a.shapes.split(","):
        for case in a.cases.split(","):
            attns = ["eager"] if case == "distill" else a.attn.split(",")
            for attn in attns:
                name = f"{shape_name}_{case}" + ("" if case == "distill" else f"_{attn}")
                t0 = time.time()
                try:
                    ts = runs[case](shapes[shape_name], attn)
                    med = statistics.median(ts)
                    toks = a.batch * a.seq
                    r = {"status": "ok", "shape": shape_name, "case": case, "attn": attn,
                         "median_s": med, "min_s": min(ts), "max_s": max(ts),
                         "tokens_per_step": toks, "tokens_per_s": toks / med, "all_s": ts}
                    if a.device == "cuda":
                        r["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(dev)
                    print(f"{name}: median {med:.4f} s/step  {toks / med:.0f} tok/s", flush=True)
                except Exception as e:  # one case's failure (OOM, an HF change) must not hide the rest
                    failed += 1
                    r = {"status": "failed", "shape": shape_name, "case": case, "attn": attn,
                         "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
                    print(f"{name}: FAILED {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                r["wall_incl_setup_s"] = time.time() - t0
                res["cases"][name] = r
                if a.device == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(dev)
                write(a.out, res)
    res["status"] = "failed" if failed else "ok"
    write(a.out, res)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
