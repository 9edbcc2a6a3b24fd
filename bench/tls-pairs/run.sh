#!/bin/bash
# TLS against plaintext on `mpc bench --shape bert-base --seq 128`, alternated pairs (odd pairs
# TLS first), on an otherwise idle machine (BENCHMARKS.md, "MPC links"). From the repo root:
#   bench/tls-pairs/run.sh [out-dir] [pairs]
B=${MPCFORMER:-${CARGO_TARGET_DIR:-target}/release/mpcformer}
O=${1:-bench/tls-pairs}
mkdir -p "$O"
for i in $(seq 1 "${2:-8}"); do
  if [ $((i % 2)) -eq 1 ]; then order="tls plain"; else order="plain tls"; fi
  for t in $order; do
    if [ $t = tls ]; then f=""; else f="--insecure-plaintext"; fi
    "$B" mpc bench --shape bert-base --seq 128 --batch 1 $f --output "$O/$t-$i.json" > "$O/$t-$i.log" 2>&1
    echo "$(date +%T) $t-$i rc=$? load=$(cut -d' ' -f1 /proc/loadavg)"
  done
done
