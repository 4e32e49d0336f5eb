#!/usr/bin/env bash
# benchmarks/stability.py on a lent GPU machine (no network): the 10-seed small-data stability
# comparison and the early-discard sweep, as two parallel halves with parallel jobs each.
#
#   bash benchmarks/stability_gpu.sh      # from the repo root, with the kit in .devkit/
#
# Kit (.devkit/, git-ignored, carried; build the kit with `bash benchmarks/make_kit.sh`): whl/
# and extra/ (hydra, omegaconf, antlr4, datasets..., hydra-joblib-launcher, joblib, cloudpickle),
# cache/ (the Rotten Tomatoes csv, MiniLM tokenizer) and minilm16/ (MiniLM's weights stored in
# fp16 to fit the carry limit; restored to fp32 here: every weight is the original rounded to
# fp16, relative error <= 4.9e-4). Carry: .devkit/whl .devkit/extra .devkit/cache .devkit/minilm16.
# Setting: Rotten Tomatoes, LABELS labelled rows (300), batch 16, EPOCHS epochs (10; mosbach its
# own 20), val/test capped at 500 rows, bf16-mixed on the GPU, lr scaling off.
set -u -o pipefail
OUT=${OUT:-/tmp/stability_out}; KIT=$PWD/.devkit; mkdir -p "$OUT"
. benchmarks/gpu_kit.sh
COMMON=(--seeds 10 --labels ${LABELS:-300} --epochs ${EPOCHS:-10} --jobs ${JOBS:-5}
        --extra trainer=gpu stage.optim.lr_scaling=none trainer.num_workers=0
        trainer.persistent_workers=false)
timeout ${LIMIT:-330} python3 benchmarks/stability.py "${COMMON[@]}" --configs none,r3f,smart \
  --discard --out /tmp/stab/a > "$OUT/stability_a.log" 2>&1 &
timeout ${LIMIT:-330} python3 benchmarks/stability.py "${COMMON[@]}" --configs freelb,mixout,mosbach \
  --out /tmp/stab/b > "$OUT/stability_b.log" 2>&1 &
wait
for h in a b; do tail -20 "$OUT/stability_$h.log"; cp /tmp/stab/$h/stability.json "$OUT/stability_$h.json" 2>/dev/null; done
tar czf "$OUT/stab_summaries.tgz" -C /tmp/stab $(cd /tmp/stab && ls -d */*/summary.md 2>/dev/null) 2>/dev/null
ls -la "$OUT"
