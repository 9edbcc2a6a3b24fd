#!/bin/bash
# Builds what bench/gpu.sh needs on the device machine, which has a GPU, CUDA and PyTorch but no
# Rust toolchain and no network (docs/src/gpu.md):
#   bench/gpu-bin/mpcformer.xz       release build with --features wgpu,cuda, stripped and
#                                    xz-compressed (100 MiB stripped, 18 MiB compressed: the raw
#                                    binary would not fit the 64 MiB a device call carries)
#   bench/gpu-bin/tools/             bench_torch.py + gen_tiny_fixtures.py from shared/tools
#                                    (shared/ does not travel to the device machine)
#   .gl/*.deb                        the Vulkan/EGL loader packages wgpu needs there (device README)
# and checks that they fit, with the repository's files, in what a device call carries (64 MiB).
# Both output folders are git-ignored; name them in the call's `carry`: [".gl", "bench/gpu-bin"].
#
#   bench/build-gpu-bin.sh           # from anywhere; honours CARGO_TARGET_DIR
#
# CUDARC_CUDA_VERSION pins the CUDA API cudarc binds to (default 13000: the device image's CUDA
# 13.0, driver 580). Without it cudarc, finding no nvcc here, binds the newest it knows (13.4),
# whose extra entry points that driver lacks.
set -euo pipefail
cd "$(dirname "$0")/.."

LIMIT=$((64 * 1024 * 1024))
export CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-13000}
TARGET=${CARGO_TARGET_DIR:-target}

echo "== cargo build --release --features wgpu,cuda --bin mpcformer (CUDARC_CUDA_VERSION=$CUDARC_CUDA_VERSION)"
cargo build --release --features wgpu,cuda --bin mpcformer

rm -rf bench/gpu-bin
mkdir -p bench/gpu-bin/tools
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# A target dir shared between checkouts has one target/release/mpcformer: copy at once and check
# that it is this build (the backends it reports).
strip -o "$tmp/mpcformer" "$TARGET/release/mpcformer"
version=$("$tmp/mpcformer" --version)
if [[ $version != *"backends: flex, wgpu, cuda"* ]]; then
    echo "error: $TARGET/release/mpcformer reports '$version', not the wgpu,cuda build" \
        "(another checkout sharing the target dir built over it?); run this again" >&2
    exit 1
fi
echo "$version"
echo "== xz -9 (about 2 minutes on 2 cores)"
xz -T2 -9 -c "$tmp/mpcformer" >bench/gpu-bin/mpcformer.xz

SHARED=${MPCFORMER_SHARED:-../shared}
for f in bench_torch.py gen_tiny_fixtures.py; do
    cp "$SHARED/tools/$f" bench/gpu-bin/tools/
done

if ! compgen -G ".gl/*.deb" >/dev/null; then
    echo "== .gl: downloading the loader packages (amd64, from Debian's archive)"
    mkdir -p .gl /tmp/amd64/partial
    o=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64)
    apt-get "${o[@]}" update >/dev/null
    (cd .gl && apt-get "${o[@]}" download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
fi

# What a device call carries: tracked files, untracked files git does not ignore, and the carried
# paths. A checkout's shared/ would travel too (this one's sits beside it, and does not).
tracked=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
untracked=$(git ls-files -z --others --exclude-standard | xargs -0 -r stat -c %s | awk '{s += $1} END {print s + 0}')
carried=$(du -cb .gl bench/gpu-bin | tail -n 1 | cut -f 1)
total=$((tracked + untracked + carried))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "binary      $(mib "$(stat -c %s "$tmp/mpcformer")") stripped, $(mib "$(stat -c %s bench/gpu-bin/mpcformer.xz)") as mpcformer.xz"
echo "carried     $(mib "$carried")  (.gl + bench/gpu-bin)"
echo "tracked     $(mib "$tracked")"
echo "untracked   $(mib "$untracked")  (not ignored: travels too)"
echo "total       $(mib "$total") of $(mib "$LIMIT")"
if ((total > LIMIT)); then
    echo "error: over the 64 MiB a device call carries: carry less (untracked files travel too)" >&2
    exit 1
fi
