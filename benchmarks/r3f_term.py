"""What R3F's term measures: the noise, or the two forwards' dropout masks.

R3F (fairseq, and ftlab) runs its clean and its noisy forward in training mode, so the two
forwards draw different dropout masks; its symmetric KL then holds both the embedding noise's
effect and the masks' difference. This script splits them on MiniLM (Rotten Tomatoes batches
through ftlab's own data path), for a fresh head and after a few plain training steps:

- ``train``: the term as training computes it, at ``eps`` 0 (no noise: dropout alone) and at
  the given ``eps`` values;
- ``eval``: the same without dropout (the noise alone; 0 at eps 0).

    python benchmarks/r3f_term.py --eps 1e-5,1e-3,1e-1 --batches 4 --warm-steps 30 --json r3f.json
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks._common import rotten_setup
from ftlab.regularizers.r3f import R3F


def terms(model, task, batches, eps: float, mode: str, seeds: int) -> list[float]:
    getattr(model, mode)()
    reg = R3F(eps=eps if eps > 0 else 1e-30)  # 1e-30: no noise (the class refuses eps 0)
    out = []
    for batch in batches:
        for seed in range(seeds):
            torch.manual_seed(seed)
            with torch.no_grad():
                extras = reg.training_loss(model, batch, task).extras
            out.append(float(next(v for k, v in extras.items() if k.startswith("r3f_"))))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eps", default="1e-5,1e-3,1e-1")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=3, help="draws per batch")
    parser.add_argument("--warm-steps", type=int, default=30,
                        help="plain AdamW steps (lr 1e-4) before the second measurement")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    task, dm, spec = rotten_setup(args.batch_size)
    dm.setup("fit")
    model = task.build_model(spec)
    loader = iter(dm.train_dataloader())
    batches = [next(loader) for _ in range(args.batches)]
    eps_values = [0.0] + [float(e) for e in args.eps.split(",")]
    results = []
    for when in ("fresh head", f"after {args.warm_steps} steps"):
        if when != "fresh head":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            model.train()
            for _ in range(args.warm_steps):
                try:
                    batch = next(loader)
                except StopIteration:
                    loader = iter(dm.train_dataloader())
                    batch = next(loader)
                task.forward(model, batch).loss.backward()
                opt.step()
                opt.zero_grad()
        for mode in ("train", "eval"):
            for eps in eps_values:
                values = terms(model, task, batches, eps, mode, args.seeds)
                row = {"model": when, "mode": mode, "eps": eps,
                       "term_mean": sum(values) / len(values), "term_min": min(values),
                       "term_max": max(values), "draws": len(values)}
                results.append(row)
                print(f"{when:18s} {mode:5s} eps {eps:<8g} term {row['term_mean']:.3e} "
                      f"({row['term_min']:.3e}-{row['term_max']:.3e}, {len(values)} draws)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
