"""Would packing rows raise MFU? Issue 13's GPU target (>= 40% MFU for a BERT-base-sized
classifier) was not met with length-bucketed batches (29.8% under CUDA graphs on an H100, 35% of
the tokens padding). This times, in one hand-written loop on the same training rows, batches
padded to fixed widths (as ``trainer=gpu`` pads them) against *packed* batches: several reviews
per row of ``--pack-width`` tokens, attention block-diagonal (a review sees only itself),
positions restarting at each review, each review's [CLS] pooled and classified. One shape for
every packed batch, so compiled code and CUDA graphs meet one shape. Nothing in ftlab packs
classification rows yet: this measures whether building it is worth it.

    python benchmarks/packing.py                                   # CPU, MiniLM, batch 32
    python benchmarks/packing.py --device cuda --precision bf16-mixed --model-size base \\
        --batch-sizes 256,1024 --compile max-autotune-no-cudagraphs --json packing.json

A packed step takes ``round(batch / reviews per packed row)`` rows, so both variants see about
``batch`` reviews a step. Figures: reviews/s (samples/s), MFU by ftlab.flops (padded tokens
counted: the work the device did, attention at the computed width) and MFU on real tokens
(its share of real tokens), median over interleaved rounds with the ratio packed/bucketed.
BERT-family models only (the [CLS] pooler and classifier of ``BertForSequenceClassification``).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics

import torch
from torch.nn import functional as F

try:
    from benchmarks import loops
    from benchmarks._common import emit, rotten_setup, spread
except ImportError:  # run as `python benchmarks/packing.py` without the repo on sys.path
    import loops
    from _common import emit, rotten_setup, spread
from ftlab.compiling import compile_model
from ftlab.flops import flop_rule
from ftlab.model.arch import backbone, pooler
from ftlab.optim import OptimSpec, build_optimizer, fuses


def first_fit(lengths: list[int], width: int) -> list[list[int]]:
    """Best-fit decreasing: row indices grouped so each group's lengths sum to <= ``width``
    (a row longer than ``width`` is an error: the task's ``max_length`` cuts rows first)."""
    if max(lengths, default=0) > width:
        raise ValueError(f"a row of {max(lengths)} tokens does not fit a {width}-token pack")
    room: list[list[int]] = [[] for _ in range(width + 1)]  # free tokens -> open packs
    packs: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        need = lengths[i]
        free = next((c for c in range(need, width + 1) if room[c]), None)
        if free is None:
            packs.append([])
            at, free = len(packs) - 1, width
        else:
            at = room[free].pop()
        packs[at].append(i)
        room[free - need].append(at)
    return packs


def packed_batch(rows: list[dict], packs: list[list[int]], width: int, segments: int,
                 pad_id: int) -> dict[str, torch.Tensor]:
    """``packs`` of ``rows`` (``input_ids``, ``labels``) as one fixed-shape batch: ids and
    positions ``[packs, width]``, ``segment_ids`` (-1: padding), each review's first token
    (``starts``) and label (``labels``, -100 where a pack has fewer than ``segments``)."""
    n = len(packs)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    pos = torch.zeros((n, width), dtype=torch.long)
    seg = torch.full((n, width), -1, dtype=torch.long)
    starts = torch.zeros((n, segments), dtype=torch.long)
    labels = torch.full((n, segments), -100, dtype=torch.long)
    for r, pack in enumerate(packs):
        at = 0
        for s, i in enumerate(pack):
            tokens = rows[i]["input_ids"]
            end = at + len(tokens)
            ids[r, at:end] = torch.as_tensor(tokens)
            pos[r, at:end] = torch.arange(len(tokens))
            seg[r, at:end] = s
            starts[r, s], labels[r, s] = at, rows[i]["labels"]
            at = end
    return {"input_ids": ids, "position_ids": pos, "segment_ids": seg, "starts": starts,
            "labels": labels}


def packed_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[packs * segments, classes]``: each review's logits as if it were a row of its own."""
    seg = batch["segment_ids"]
    n, width = seg.shape
    eye = torch.eye(width, dtype=torch.bool, device=seg.device)
    mask = ((seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)) | eye  # padding:
    hidden = backbone(model)(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                             attention_mask=mask[:, None]).last_hidden_state  # itself only
    first = batch["starts"] + torch.arange(n, device=seg.device)[:, None] * width
    cls = hidden.reshape(n * width, -1)[first.reshape(-1)][:, None]  # [reviews, 1, hidden]
    return model.classifier(model.dropout(pooler(model)(cls)))


class Packed(torch.nn.Module):
    """``packed_logits`` as a module's forward, so that ``torch.compile`` (``trainer.compile``'s
    ``compile_model``) compiles the whole packed step, mask and gathers included."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        return packed_logits(self.model, batch)


def packed_loss(packed: Packed, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "segment_ids", "starts")}
    return F.cross_entropy(packed(**inputs).float(), batch["labels"].reshape(-1),
                           ignore_index=-100)


def packed_epoch(rows: list[dict], batch: int, width: int, pad_id: int,
                 seed: int = 0) -> tuple[list[dict], float, float]:
    """An epoch of packed batches (a full last batch only), the reviews per packed row and the
    share of real tokens. Packs are made over the shuffled rows, then shuffled."""
    lengths = [len(r["input_ids"]) for r in rows]
    packs = first_fit(lengths, width)
    per_pack = len(rows) / len(packs)
    size = max(1, round(batch / per_pack))
    order = torch.randperm(len(packs), generator=torch.Generator().manual_seed(seed)).tolist()
    packs = [packs[i] for i in order]
    segments = max(len(p) for p in packs)
    out = [packed_batch(rows, packs[i:i + size], width, segments, pad_id)
           for i in range(0, len(packs) - size + 1, size)]
    return out, per_pack, sum(lengths) / (len(packs) * width)


def timed(model, batches: list[dict], loss_of, args, device, rule, mode) -> dict:
    """``args.steps`` optimiser steps after ``args.warmup`` untimed ones (norm clipping at 1.0,
    AdamW and the schedule as ftlab builds them): seconds, reviews, FLOPs."""
    total = args.warmup + args.steps
    opt, sched = build_optimizer(model, OptimSpec(), total,
                                 fused=fuses(args.precision, device.type))
    reviews = flops = 0.0
    start = 0.0
    for step in range(total):
        cpu = batches[step % len(batches)]
        if step == args.warmup:
            start = loops.Clock(device, 1, 0).now()
        if step >= args.warmup:  # counted on the host: no device sync inside the window
            reviews += int((cpu["labels"] != -100).sum())
            flops += rule.per_batch(*cpu["input_ids"].shape)
        b = {k: v.to(device, non_blocking=True) for k, v in cpu.items()}
        loops.mark_step(mode)
        with torch.autocast(device.type, dtype=torch.bfloat16,
                            enabled=args.precision == "bf16-mixed"):
            loss = loss_of(model, b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched["scheduler"].step()
        opt.zero_grad(set_to_none=True)
    seconds = loops.Clock(device, 1, 0).now() - start
    return {"seconds": seconds, "reviews": reviews, "flops": flops}


def bench(args, device, size: int, task, dm, spec) -> dict:
    dm.batch_size = size
    bucketed = list(dm.train_dataloader())
    rows = list(dm.splits["train"])
    packed, per_pack, packed_share = packed_epoch(rows, size, args.pack_width,
                                                  dm.collate.pad_id)
    real = sum(int(b["attention_mask"].sum()) for b in bucketed)
    bucketed_share = real / sum(b["input_ids"].numel() for b in bucketed)
    torch.manual_seed(0)
    base = task.build_model(spec)
    rule = flop_rule(base)
    initial = {k: v.detach().clone() for k, v in base.state_dict().items()}
    variants = {"bucketed": (bucketed, lambda m, b: task.forward(m, b).loss, bucketed_share),
                "packed": (packed, packed_loss, packed_share)}
    nets = {name: copy.deepcopy(base).to(device).train() for name in variants}
    models = {"bucketed": compile_model(nets["bucketed"], args.compile),
              "packed": compile_model(Packed(nets["packed"]), args.compile)}
    warm_up = device.type == "cuda" or args.compile  # kernel planning, compiling, graphs
    for name, (batches, loss_of, _) in variants.items() if warm_up else ():  # every shape
        shapes = {tuple(b["input_ids"].shape): b for b in batches}  # untimed first, 3 times
        warm = argparse.Namespace(**{**vars(args), "warmup": len(shapes) * 3, "steps": 0})
        timed(models[name], list(shapes.values()), loss_of, warm, device, rule, args.compile)
    out: dict[str, list[dict]] = {name: [] for name in variants}
    for r in range(args.rounds):
        for name in list(variants) if r % 2 == 0 else list(variants)[::-1]:
            with torch.no_grad():  # in place: compiled code and graphs stay valid
                nets[name].load_state_dict(initial)
            batches, loss_of, _ = variants[name]
            out[name].append(timed(models[name], batches, loss_of, args, device, rule,
                                   args.compile))
        last = {k: v[-1] for k, v in out.items()}
        print(f"  batch {size} round {r + 1}/{args.rounds}: reviews/s bucketed "
              f"{last['bucketed']['reviews'] / last['bucketed']['seconds']:.1f}  packed "
              f"{last['packed']['reviews'] / last['packed']['seconds']:.1f}", flush=True)
    gpu = device.type == "cuda"
    row: dict = {"batch_size": size, "packed_rows_per_step": packed[0]["input_ids"].shape[0],
                 "reviews_per_packed_row": round(per_pack, 2)}
    for name, runs in out.items():
        share = variants[name][2]
        flops = statistics.median(x["flops"] / x["seconds"] for x in runs)
        row[name] = {"samples_per_s": round(statistics.median(
            x["reviews"] / x["seconds"] for x in runs), 1), "real_token_share": round(share, 4),
            "shapes": len({tuple(b["input_ids"].shape) for b in variants[name][0]}),
            "mfu": round(flops / args.peak_flops, 4) if gpu else None,
            "mfu_real_tokens": round(share * flops / args.peak_flops, 4) if gpu else None}
    ratios = [(p["reviews"] / p["seconds"]) / (b["reviews"] / b["seconds"])
              for p, b in zip(out["packed"], out["bucketed"], strict=True)]
    row["packed_vs_bucketed"] = spread(ratios)
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model-size", default=None, choices=["minilm", "tiny", "base"],
                        help="default: minilm on the CPU, base on cuda")
    parser.add_argument("--batch-sizes", default="32", help="reviews per step, comma list")
    parser.add_argument("--pack-width", type=int, default=128, help="tokens per packed row")
    parser.add_argument("--pad-buckets", default="32,48,64,96,128",
                        help="the bucketed variant's widths (trainer=gpu's); none: each "
                             "batch padded to its longest row (the CPU default)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--compile", default=None,
                        choices=["default", "max-autotune-no-cudagraphs", "reduce-overhead"],
                        help="torch.compile both models with this mode")
    parser.add_argument("--max-train", type=int, default=None, help="cap the training rows")
    parser.add_argument("--peak-flops", type=float, default=989e12,
                        help="peak FLOP/s for MFU (H100 dense bf16: 989e12)")
    parser.add_argument("--json", metavar="FILE", help="also write the JSON figures here")
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    args.model_size = args.model_size or ("base" if gpu else "minilm")
    torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("high")
    device = torch.device(args.device)
    spec = loops.model_spec(args.model_size)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    buckets = None if args.pad_buckets == "none" else [int(w) for w in
                                                        args.pad_buckets.split(",")]
    task, dm, _ = rotten_setup(sizes[0], max_train=args.max_train, model=spec,
                               pad_to_buckets=buckets)
    if task.max_length > args.pack_width:
        parser.error(f"--pack-width {args.pack_width} is narrower than the task's "
                     f"max_length {task.max_length}: a review would not fit a pack")
    name = torch.cuda.get_device_name(device) if gpu else "CPU"
    print(f"torch {torch.__version__} on {name}, model {args.model_size}, precision "
          f"{args.precision}, batches {sizes}, pack width {args.pack_width}, buckets "
          f"{args.pad_buckets}, compile {args.compile}, {args.steps} (+{args.warmup}) steps, "
          f"{args.rounds} rounds, load {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    for size in sizes:
        try:
            rows.append(bench(args, device, size, task, dm, spec))
        except torch.OutOfMemoryError:
            print(f"  batch {size}: out of memory", flush=True)
            rows.append({"batch_size": size, "oom": True})
    print("\n| reviews/step | packed rows x width | bucketed reviews/s | packed reviews/s | "
          "packed/bucketed (range) | real tokens bucketed / packed | MFU bucketed / packed | "
          "MFU real tokens bucketed / packed |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("oom"):
            print(f"| {r['batch_size']} | out of memory | | | | | | |")
            continue
        b, p, q = r["bucketed"], r["packed"], r["packed_vs_bucketed"]

        def pct(x):
            return f"{x:.1%}" if x is not None else "-"

        print(f"| {r['batch_size']} | {r['packed_rows_per_step']} x {args.pack_width} | "
              f"{b['samples_per_s']:.0f} | {p['samples_per_s']:.0f} | {q['median']:.2f} "
              f"({q['min']:.2f}-{q['max']:.2f}) | {b['real_token_share']:.2f} / "
              f"{p['real_token_share']:.2f} | {pct(b['mfu'])} / {pct(p['mfu'])} | "
              f"{pct(b['mfu_real_tokens'])} / {pct(p['mfu_real_tokens'])} |")
    result = {"benchmark": "packing", "torch": torch.__version__, "device": name,
              "model_size": args.model_size, "precision": args.precision,
              "pack_width": args.pack_width, "pad_buckets": args.pad_buckets,
              "compile": args.compile, "rounds": args.rounds, "steps": args.steps,
              "timing": "wall, device-synchronised" if gpu else "process CPU time",
              "load_avg": [round(x, 2) for x in os.getloadavg()], "batches": rows}
    return emit(result, args.json)


if __name__ == "__main__":
    main()
