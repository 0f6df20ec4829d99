#!/usr/bin/env bash
# Run every nvmeta benchmark, one after the other (they compete for the same cores), each printing
# nvmeta's figure, its baseline's and the ratio. Output: OUTDIR/<benchmark>.txt (default benchmarks/out/).
# Usage: bash benchmarks/run_all.sh [OUTDIR]     (PYTHON=... to choose the interpreter)
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)"
OUT="${1:-benchmarks/out}"
mkdir -p "$OUT"

run() {
    local name="$1"
    shift
    echo "== $name: $PYTHON -u $*  ($(date -u +%H:%M:%S), load $(cut -d' ' -f1-3 /proc/loadavg))"
    "$PYTHON" -u "$@" 2>&1 | tee "$OUT/$name.txt"
}

run vs_recipe benchmarks/bench_vs_recipe.py
run per_image_snakemake benchmarks/bench_per_image_snakemake.py --n-images 100 --cores 1 2
run per_image benchmarks/bench_per_image.py --repeat 5
run downloads benchmarks/bench_downloads.py --n-images 200 --latency 0.1
run dag benchmarks/bench_dag.py --sizes 1000 10000 --profile
run fanin_memory benchmarks/bench_dag.py --sizes --fanin 1000 10000
run permutation benchmarks/bench_permutation.py --synthetic 200 --exact
run dependence benchmarks/bench_dependence.py
echo "== done; summary lines:"
grep -h -E "ratio|faster" "$OUT"/*.txt | grep -v "^ " || true
