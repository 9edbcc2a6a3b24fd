#!/bin/bash
# The device machine's one script (docs/src/gpu.md): what works on its GPU, and how fast.
#
# Run from the repository root, with the binary from bench/build-gpu-bin.sh carried in
# bench/gpu-bin/ (and the Vulkan loader packages in .gl/ for wgpu):
#   bash bench/gpu.sh            # results under $OUT, or ./gpu-out where OUT is unset
#
# Steps, in order of what matters most if time runs short:
#   nvidia-smi; mpcformer --version; a tiny `bench infer` on --device cuda (a backend that fails
#   it is skipped after); bench/torch_gpu.py (PyTorch, same cases and shapes); `mpcformer bench
#   distill|train|infer --shape minilm|bert-base --batch 32 --seq 128 --device cuda`; the
#   quickstart recipe on cuda; then the tiny bench and the same benches on --device wgpu.
# Every step runs under its own `timeout` (and the whole under a budget, GPU_SH_BUDGET_S), and is
# recorded as ok / failed / skipped with the reason in $OUT/gpu.json; the full output of every
# step is in $OUT/gpu.log. The device tool brings back at most 8 files from $OUT, so everything
# else stays in a work folder. Without an NVIDIA GPU (no working nvidia-smi) the GPU steps are
# skipped, saying so, and the script exits 0. With a GPU it exits 1 if any step failed.
#
# Knobs (environment): GPU_SH_BUDGET_S (450 s for all steps), GPU_SH_BACKENDS ("cuda wgpu"),
# GPU_SH_SHAPES ("minilm bert-base"), GPU_SH_CASES ("distill train infer"), GPU_SH_BATCH (32),
# GPU_SH_SEQ (128), GPU_SH_WARMUP (2), GPU_SH_STEPS (5), GPU_SH_QUICKSTART (1: run it),
# GPU_SH_TORCH (1: run bench/torch_gpu.py), GPU_SH_SMOKE_S (90) and GPU_SH_BENCH_S (75): the
# timeout of each tiny bench and of each bench, GPU_SH_QUICKSTART_S (150), MPCFORMER_BIN, PYTHON (python3), and GPU_SH_FORCE=1
# to run the GPU steps even with no NVIDIA GPU (to exercise this script on another machine).
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 1

OUT=${OUT:-./gpu-out}
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d /tmp/mpcformer-gpu.XXXXXX) || exit 1
LOG=$OUT/gpu.log
STEPS=$WORK/steps.tsv
: >"$LOG"
: >"$STEPS"

BUDGET=${GPU_SH_BUDGET_S:-450}
BACKENDS=${GPU_SH_BACKENDS:-cuda wgpu}
SHAPES=${GPU_SH_SHAPES:-minilm bert-base}
CASES=${GPU_SH_CASES:-distill train infer}
BATCH=${GPU_SH_BATCH:-32}
SEQ=${GPU_SH_SEQ:-128}
WARMUP=${GPU_SH_WARMUP:-2}
NSTEPS=${GPU_SH_STEPS:-5}
PY=${PYTHON:-python3}
SMOKE_S=${GPU_SH_SMOKE_S:-90}
BENCH_S=${GPU_SH_BENCH_S:-75}
START=$(date +%s)

log() { echo "$*" | tee -a "$LOG" >&2; }

# record NAME STATUS REASON SECONDS RC RESULT_FILE COMMAND — one line of steps.tsv (tabs and
# newlines inside fields become spaces).
record() {
    local f out=()
    for f in "$@"; do out+=("$(printf '%s' "$f" | tr '\t\n' '  ')"); done
    (IFS=$'\t'; echo "${out[*]}") >>"$STEPS"
    log "== $1: $2${3:+ ($3)}"
}

remaining() { echo $((BUDGET - ($(date +%s) - START))); }

# step NAME CAP_SECONDS RESULT_FILE CMD... — runs CMD under `timeout`, at most CAP seconds and
# never past the budget; its output goes to gpu.log; the result file (if any) is embedded in
# gpu.json. Sets LAST_STATUS (ok|failed|timeout|skipped).
step() {
    local name=$1 cap=$2 result=$3
    shift 3
    local left t rc t0 ms secs reason
    left=$(remaining)
    if ((left < 20)); then
        record "$name" skipped "time budget spent (GPU_SH_BUDGET_S=$BUDGET)" 0 "" "" "$*"
        LAST_STATUS=skipped
        return
    fi
    t=$((cap < left ? cap : left))
    log "== $name: $* (timeout ${t}s)"
    t0=$(date +%s%N)
    # -k: a process that ignores SIGTERM (a wedged driver call) is killed 10 s later.
    timeout -k 10 "$t" "$@" >"$WORK/$name.out" 2>&1
    rc=$?
    ms=$((($(date +%s%N) - t0) / 1000000))
    secs=$(printf '%d.%03d' $((ms / 1000)) $((ms % 1000)))
    # Cap what one step adds to the log: $OUT files come back only up to 16 MiB each.
    tail -c 1000000 "$WORK/$name.out" >>"$LOG"
    if ((rc == 0)); then
        record "$name" ok "" "$secs" 0 "$result" "$*"
        LAST_STATUS=ok
    elif ((rc == 124 || rc == 137)); then
        record "$name" failed "timed out after ${t} s" "$secs" "$rc" "$result" "$*"
        LAST_STATUS=timeout
    else
        # The last line that names an error, and the one after it: a panic's message follows
        # its "panicked at" line.
        reason=$(grep -v '^\s*$' "$WORK/$name.out" | grep -iE -A1 'error|panick|fail' | tail -n 2 | tr '\n' ' ')
        [[ -n $reason ]] || reason=$(grep -v '^\s*$' "$WORK/$name.out" | tail -n 1)
        record "$name" failed "exit $rc: ${reason:0:400}" "$secs" "$rc" "$result" "$*"
        LAST_STATUS=failed
    fi
}

skip() { record "$1" skipped "$2" 0 "" "" "${3:-}"; }

# ---- Environment -------------------------------------------------------------------------------
log "== bench/gpu.sh $(date -u +%FT%TZ) on $(hostname), $(nproc) cores; budget ${BUDGET}s; out $OUT"

if [[ -z ${VK_DRIVER_FILES:-} && ! -e /usr/share/vulkan/icd.d/nvidia_icd.json &&
    ! -e /etc/vulkan/icd.d/nvidia_icd.json && -e /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]]; then
    # Where the device machine's driver mount keeps its Vulkan ICD (device README).
    export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
    export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
fi
# wgpu warns on every start without it.
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-$WORK/xdg}
mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"

# cubecl-cuda compiles kernels with NVRTC and includes the toolkit's headers from $CUDA_PATH
# (default /usr/local/cuda); cudarc dlopens libnvrtc by bare name, so its folder must be known
# to the loader.
if [[ -z ${CUDA_PATH:-} && ! -d /usr/local/cuda ]] && command -v nvcc >/dev/null; then
    CUDA_PATH=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
    export CUDA_PATH
fi
CUDA_ROOT=${CUDA_PATH:-/usr/local/cuda}
if ! ldconfig -p 2>/dev/null | grep -q libnvrtc.so; then
    for d in "$CUDA_ROOT/lib64" "$CUDA_ROOT/lib" "$CUDA_ROOT/targets/x86_64-linux/lib"; do
        if compgen -G "$d/libnvrtc.so*" >/dev/null; then
            export LD_LIBRARY_PATH=$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
            break
        fi
    done
fi
{
    echo "CUDA_PATH=${CUDA_PATH:-(unset; /usr/local/cuda $([[ -d /usr/local/cuda ]] && echo exists || echo missing))}"
    echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
    echo "VK_DRIVER_FILES=${VK_DRIVER_FILES:-}"
    echo "nvcc: $(command -v nvcc || echo none)"
    echo "libcuda: $(ldconfig -p 2>/dev/null | grep -m1 'libcuda.so.1' || echo 'not in ldconfig')"
    echo "libnvrtc: $(ldconfig -p 2>/dev/null | grep -m1 'libnvrtc.so' || echo 'not in ldconfig')"
} >"$WORK/env.txt"
cat "$WORK/env.txt" >>"$LOG"

GPU=0
if command -v nvidia-smi >/dev/null; then
    step nvidia-smi 30 "" nvidia-smi
    [[ $LAST_STATUS == ok ]] && GPU=1
    cp "$WORK/nvidia-smi.out" "$WORK/nvidia-smi.txt"
else
    skip nvidia-smi "no NVIDIA GPU: nvidia-smi is not installed"
fi
NO_GPU_REASON="no NVIDIA GPU on this machine (nvidia-smi $([[ -e $WORK/nvidia-smi.out ]] && echo failed || echo missing))"
if ((GPU == 0)) && [[ ${GPU_SH_FORCE:-0} == 1 ]]; then
    log "GPU_SH_FORCE=1: running the GPU steps anyway"
    GPU=1
fi

# The Vulkan loader (wgpu needs libvulkan.so.1), the device README's way: unpack the carried
# packages at /, as root. Only there: with a GPU and no loader installed (never on a developer's
# or CI's machine), and only these packages: others can break /.
if ((GPU == 1)) && compgen -G ".gl/*.deb" >/dev/null; then
    if ldconfig -p 2>/dev/null | grep -q 'libvulkan.so.1'; then
        log "libvulkan.so.1 is installed: not unpacking .gl/"
    elif ((EUID == 0)) && command -v dpkg >/dev/null; then
        for f in .gl/*.deb; do dpkg -x "$f" / || log "dpkg -x $f failed"; done
        ldconfig
        log "unpacked $(ls .gl/*.deb | wc -l) loader packages from .gl/"
    else
        log "not unpacking .gl/ (needs root and dpkg): wgpu will find no Vulkan loader"
    fi
fi
if ((GPU == 1)); then
    vk="libvulkan: $(ldconfig -p 2>/dev/null | grep -m1 'libvulkan.so.1' || echo 'not in ldconfig')"
    echo "$vk" >>"$WORK/env.txt"
    log "$vk"
fi

# ---- The binary --------------------------------------------------------------------------------
BIN=${MPCFORMER_BIN:-}
if [[ -z $BIN ]]; then
    if [[ -x bench/gpu-bin/mpcformer ]]; then
        BIN=bench/gpu-bin/mpcformer
    elif [[ -f bench/gpu-bin/mpcformer.xz ]]; then
        # As bench/build-gpu-bin.sh carries it (compressed to fit a device call); python3's lzma
        # where xz is not installed.
        if command -v xz >/dev/null; then
            xz -dc bench/gpu-bin/mpcformer.xz >"$WORK/mpcformer"
        else
            "$PY" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
                bench/gpu-bin/mpcformer.xz "$WORK/mpcformer"
        fi && chmod +x "$WORK/mpcformer" && BIN=$WORK/mpcformer
    elif [[ -x ${CARGO_TARGET_DIR:-target}/release/mpcformer ]]; then
        BIN=${CARGO_TARGET_DIR:-target}/release/mpcformer
    fi
fi
HAVE_BIN=0
if [[ -z $BIN ]]; then
    # Not a missing device: the binary was not built or not carried. A real error.
    record mpcformer-version failed "no mpcformer binary: run bench/build-gpu-bin.sh and carry bench/gpu-bin" 0 "" "" ""
else
    BIN=$(readlink -f "$BIN")
    step mpcformer-version 10 "" "$BIN" --version
    [[ $LAST_STATUS == ok ]] && HAVE_BIN=1
fi
COMPILED=$( ((HAVE_BIN)) && cat "$WORK/mpcformer-version.out" || echo "")

# ---- Steps -------------------------------------------------------------------------------------
bench_args() { # CASE SHAPE BACKEND
    echo "bench $1 --shape $2 --batch $BATCH --seq $SEQ --warmup $WARMUP --steps $NSTEPS --device $3 --output $WORK/bench-$3-$2-$1.json"
}

declare -A USABLE
smoke() { # BACKEND — a tiny `bench infer`: does the backend start, compile kernels and run?
    local be=$1 name=smoke-$1
    if ((GPU == 0)); then
        skip "$name" "$NO_GPU_REASON"
    elif ((HAVE_BIN == 0)); then
        skip "$name" "no working mpcformer binary (see mpcformer-version)"
    elif [[ $COMPILED != *"$be"* ]]; then
        record "$name" failed "the binary was built without $be ($COMPILED); rebuild with bench/build-gpu-bin.sh" 0 "" "" ""
    else
        step "$name" "$SMOKE_S" "$WORK/$name.json" "$BIN" bench infer --shape minilm --batch 2 --seq 16 \
            --warmup 1 --steps 1 --device "$be" --output "$WORK/$name.json"
        [[ $LAST_STATUS == ok ]] && USABLE[$be]=1
    fi
}

run_benches() { # BACKEND
    local be=$1 shape case hung=""
    for shape in $SHAPES; do
        for case in $CASES; do
            local name=bench-$be-$shape-$case
            if ((GPU == 0)); then
                skip "$name" "$NO_GPU_REASON"
            elif [[ -z ${USABLE[$be]:-} ]]; then
                skip "$name" "smoke-$be did not pass"
            elif [[ -n $hung ]]; then
                # A hang tends to repeat; don't let it eat the budget case after case.
                skip "$name" "$hung timed out"
            else
                # shellcheck disable=SC2046  # bench_args is a word list by design
                step "$name" "$BENCH_S" "$WORK/bench-$be-$shape-$case.json" "$BIN" $(bench_args "$case" "$shape" "$be")
                [[ $LAST_STATUS == timeout ]] && hung=$name
            fi
        done
    done
}

torch_step() {
    if [[ ${GPU_SH_TORCH:-1} != 1 ]]; then
        skip torch "GPU_SH_TORCH=${GPU_SH_TORCH}"
    elif ((GPU == 0)); then
        skip torch "$NO_GPU_REASON"
    elif ! "$PY" -c "import torch" 2>/dev/null; then
        record torch failed "$PY cannot import torch" 0 "" "" ""
    else
        step torch 150 "$OUT/torch-gpu.json" "$PY" bench/torch_gpu.py --out "$OUT/torch-gpu.json" \
            --device cuda --shapes "${SHAPES// /,}" --cases "${CASES// /,}" --batch "$BATCH" \
            --seq "$SEQ" --warmup 3 --steps 10 --require-cuda
    fi
}

quickstart_step() { # BACKEND
    local be=$1
    if [[ ${GPU_SH_QUICKSTART:-1} != 1 ]]; then
        skip "quickstart-$be" "GPU_SH_QUICKSTART=${GPU_SH_QUICKSTART}"
    elif ((GPU == 0)); then
        skip "quickstart-$be" "$NO_GPU_REASON"
    elif [[ -z ${USABLE[$be]:-} ]]; then
        skip "quickstart-$be" "smoke-$be did not pass"
    else
        step "quickstart-$be" "${GPU_SH_QUICKSTART_S:-150}" "$WORK/runs-$be/quickstart/summary.json" "$BIN" run recipes/quickstart.toml \
            --set "device=$be" --set "output_dir=$WORK/runs-$be"
    fi
}

# Most important first, so that a short budget cuts the least: the first backend (cuda) and
# PyTorch beside it, its quickstart, then the other backends.
first_be=${BACKENDS%% *}
smoke "$first_be"
torch_step
run_benches "$first_be"
quickstart_step "$first_be"
for be in $BACKENDS; do
    [[ $be == "$first_be" ]] && continue
    smoke "$be"
    run_benches "$be"
done

# ---- Summary -----------------------------------------------------------------------------------
cp "$STEPS" "$OUT/steps.tsv"
if ! command -v "$PY" >/dev/null; then
    log "ERROR: $PY not found: cannot write gpu.json; the step records are in $OUT/steps.tsv"
    exit 1
fi
"$PY" - "$STEPS" "$OUT/gpu.json" "$WORK" "$((GPU))" "$NO_GPU_REASON" "$COMPILED" <<'EOF'
import json, os, sys
steps_path, out_path, work, gpu, no_gpu, compiled = sys.argv[1:7]
steps = []
for line in open(steps_path):
    name, status, reason, secs, rc, result, cmd = (line.rstrip("\n").split("\t") + [""] * 7)[:7]
    s = {"name": name, "status": status, "reason": reason or None, "seconds": float(secs or 0),
         "exit": int(rc) if rc else None, "command": cmd or None}
    if result and os.path.exists(result):
        try:
            s["result"] = json.load(open(result))
        except ValueError as e:
            s["result_error"] = f"{result}: {e}"
    steps.append(s)
def text(name):
    p = os.path.join(work, name)
    return open(p).read() if os.path.exists(p) else None
summary = {
    "gpu_present": gpu == "1", "no_gpu_reason": None if gpu == "1" else no_gpu,
    "mpcformer": compiled.strip() or None, "environment": text("env.txt"),
    "nvidia_smi": text("nvidia-smi.txt"),
    "counts": {k: sum(s["status"] == k for s in steps) for k in ("ok", "failed", "skipped")},
    "steps": steps,
}
json.dump(summary, open(out_path, "w"), indent=1)
print(f"{'step':34} {'status':8} {'s':>7}  tokens/s / reason")
for s in steps:
    r = s.get("result") or {}
    what = f"{r['tokens_per_s']:.0f} tok/s" if isinstance(r, dict) and "tokens_per_s" in r else (s["reason"] or "")
    print(f"{s['name']:34} {s['status']:8} {s['seconds']:7.1f}  {what[:150]}")
print(f"wrote {out_path}")
EOF
rc=$?
((rc == 0)) || { log "ERROR: writing gpu.json failed"; exit 1; }
rm -rf "$WORK"
if ((GPU == 0)); then
    log "no GPU: GPU steps skipped ($NO_GPU_REASON)"
    exit 0
fi
grep -q $'\tfailed\t' "$OUT/steps.tsv" && exit 1
exit 0
