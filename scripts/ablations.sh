#!/usr/bin/env bash
# The ablations of docs/results.md, one command each: the paper's knobs on the paper preset, and the
# default preset's own knobs. Tuning half of the dev set, first N images (default 100), one thread.
# Usage: scripts/ablations.sh [N] [OUT]
set -euo pipefail
N=${1:-100}
OUT=${2:-runs/ablations}
D=${DATA:-../shared/data/ilsvrc2012_val_dev}
# evaluate prints the comparison table, then the confidence table: keep the first one's rows, and its errors.
rows() { awk 'NR > 2 && /^\| method \|/ { done = 1 } NR > 2 && !done'; }
run() { name=$1; shift; neuroloc evaluate "$D" --split tune --limit "$N" --threads 1 --output "$OUT/$name" "$@" 2>"$OUT/$name.log" | rows || { tail -n 3 "$OUT/$name.log" >&2; exit 1; }; }
mkdir -p "$OUT"
run default         --method dam
run density_level   --method dam --sweep level=0.2,0.25,0.3,0.35,0.4
run density_layers  --method dam --sweep density_layers=_blocks.7,_blocks.10,_blocks.14,_head_act,_blocks.10+_blocks.14,_blocks.7+_blocks.10+_blocks.14
run rescoring       --method dam:paper --sweep rescoring=mask,crop,none
run kmax            --method dam:paper --sweep kmax=10,30
run k               --method dam:paper --sweep k=1,3,5,7,10
run layer           --method dam:paper --sweep layer=_blocks.7,_blocks.10,_blocks.14,_head_act
run percentile      --method dam:paper --sweep percentile=60,80,90,95
run morphology      --method dam:paper --sweep morphology=none,paper,authors
run one_per_channel --method dam:paper --sweep one_per_channel=false,true
run class_gradient  --method dam:paper --sweep class_gradient=plain,guided
run score           --method dam:paper --sweep score=logit,probability
run map_blur        --method dam:paper --sweep map_blur=0,4
