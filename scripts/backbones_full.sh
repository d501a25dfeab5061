#!/usr/bin/env bash
# docs/backbones.md's full-dev table: the default preset, Grad-CAM and the centred box on every backbone.
set -euo pipefail
D=${DATA:-../shared/data/ilsvrc2012_val_dev}
OUT=${1:-runs/backbones_full}
for M in efficientnet_lite1 efficientnet_lite2 resnet50_keras squeezenet1_1; do
  neuroloc evaluate "$D" --model "$M" --threads 1 --output "$OUT/$M" --method dam --method gradcam --method center 2>/dev/null | tail -n +3 | sed "s/^| /| $M | /"
done
