"""ftlab's training step against a hand-written PyTorch loop on the same batches (Rotten
Tomatoes, length-bucketed), on the CPU or a GPU; on the CPU also length bucketing against
padding every batch to 128 tokens.

    python benchmarks/overhead.py [--rounds 5] [--threads 1] [--steps 40] [--json FILE]
    python benchmarks/overhead.py --device cuda --precision bf16-mixed --model-size base \\
        --batch-sizes 32,128,512,1024 --json gpu.json
    python benchmarks/overhead.py --device cuda --precision bf16-mixed --model-size base \\
        --batch-sizes 32,128,512,1024 --pad-buckets 32,48,64,96,128 --compile reduce-overhead

Models (``--model-size``): ``minilm`` the pre-trained all-MiniLM-L6-v2 (CPU default),
``tiny`` conf/model/tiny_bert.yaml, ``base`` conf/model/bert_base_random.yaml (BERT-base's
shape, random weights, the MiniLM tokenizer; the GPU default).

Measured as the stack notes say: variants interleaved in one process (each round runs each
once; odd rounds in reverse order), the same batches every round (a fresh loader with the same
seed), the median ratio and its range. On the CPU the cost is CPU time per optimiser step
(``time.process_time``) at a fixed thread count; on a GPU wall time with the device
synchronised at the window's ends only, after every batch shape was met once (a new shape
costs kernel planning). Both loops read batches through the same DataLoader settings
(``--num-workers``, pinned memory on a GPU, ``--pad-multiple``); the plain loop is AdamW (as
ftlab builds it), autocast, norm clipping at 1.0 and the LR schedule, nothing else.

- ftlab/plain = plain seconds per step / ftlab seconds per step (>= 0.97 is the GPU target;
  on the CPU ``overhead`` = its inverse, target <= 1.05).
- samples/s and padded tokens/s of each loop; MFU = model FLOPs/s (``ftlab.flops``: PaLM's
  6 x non-embedding parameters + the attention term, padded tokens counted) / ``--peak-flops``
  (989e12: an H100 SXM's dense bf16); ``mfu_real_tokens`` scales it by the epoch's share of
  real tokens (approximately: the attention term is not re-counted); ``mfu_6n_total`` is the
  formula of earlier runs, 6 x all parameters x padded tokens/s, which counts the embedding
  lookups as multiplications (+28% for BERT-base).
- bucketing (CPU) = pad-to-128 CPU-s/example / length-bucketed CPU-s/example (target >= 2).

``--pad-buckets`` pads batches to fixed widths (``trainer.pad_to_buckets``) and ``--compile MODE``
compiles every variant's model in place (``trainer.compile``), both loops alike. Each variant
keeps one model over the rounds (weights put back in place, so compiled code and CUDA graphs
recorded for its parameters' addresses stay valid), and first meets every batch shape untimed
through its own loop (what is compiled depends on the loop: Lightning's autocast turns the cast
cache off, and torch.compile guards on that). ``--trace N`` profiles N more steps of each.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics

import torch

try:
    from benchmarks import loops
    from benchmarks._common import emit, rotten_setup, spread
    from benchmarks.step_trace import trace
except ImportError:  # run as `python benchmarks/overhead.py` without the repo on sys.path
    import loops
    from _common import emit, rotten_setup, spread
    from step_trace import trace
from ftlab.compiling import compile_model  # as trainer.compile does (ftlab.stage)
from ftlab.flops import flop_rule


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_batch(args, device, size: int, spec, data) -> dict:
    """Every variant at one batch size, ``args.rounds`` interleaved rounds. Each variant keeps
    one model (compiled in place with ``--compile``) over all its rounds, put back to the same
    initial weights before each round in place, so its compiled code and CUDA graphs (recorded
    for its parameters' addresses) are built once, before timing."""
    task, dm, padded = data
    dm.batch_size = size
    torch.manual_seed(0)
    base = task.build_model(spec)
    rule, params = flop_rule(base), sum(p.numel() for p in base.parameters())
    initial = {k: v.detach().clone() for k, v in base.state_dict().items()}
    batches, real_share = loops.epoch_batches(dm.train_dataloader())
    variants = {"plain": loops.run_plain, "ftlab": loops.run_ftlab,
                **({"module": loops.run_module} if args.module else {})}
    names = [*variants, *(["pad128"] if args.pad128 else [])]
    models = {name: compile_model(copy.deepcopy(base), args.compile) for name in names}
    del base
    for name, run in variants.items():
        loops.warm(run, task, models[name], batches, device, args.precision, args.compile)
    free(device)
    out: dict[str, list] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            steps = args.steps if name != "pad128" else args.pad_steps
            clock = loops.Clock(device, args.warmup, steps, rule)
            with torch.no_grad():  # in place: the same parameter tensors every round
                models[name].load_state_dict(initial)
            if name == "pad128":  # random batches, each padded to 128 (run_glue's default)
                loader = torch.utils.data.DataLoader(
                    padded.splits["train"], batch_size=size, shuffle=True,  # same seed each time
                    collate_fn=padded.collate, generator=torch.Generator().manual_seed(0))
                loops.run_ftlab(task, models[name], loader, clock, args.precision, args.compile)
            else:
                variants[name](task, models[name], dm.train_dataloader(), clock, args.precision,
                               args.compile)
            out[name].append(clock)
            free(device)
        c = {k: v[-1] for k, v in out.items()}
        print(f"  batch {size} round {r + 1}/{args.rounds}: s/step plain "
              f"{c['plain'].seconds / c['plain'].steps:.4f}  ftlab "
              f"{c['ftlab'].seconds / c['ftlab'].steps:.4f}  ftlab/plain "
              f"{c['plain'].seconds / c['ftlab'].seconds:.3f}"
              + (f"  module/plain {c['plain'].seconds / c['module'].seconds:.3f}"
                 if "module" in c else ""), flush=True)
    if args.trace:  # one more short run of each variant under the profiler (untimed)
        row_trace = {}
        for name, run in variants.items():
            with torch.no_grad():
                models[name].load_state_dict(initial)
            clock = loops.Clock(device, args.warmup, args.trace)
            row_trace[name] = trace(lambda run=run, model=models[name], clock=clock: run(
                task, model, dm.train_dataloader(), clock, args.precision, args.compile),
                steps=args.warmup + args.trace)
            t = row_trace[name]
            print(f"  batch {size} {name}: {t['graph_launches_per_step']} CUDA graph launches "
                  f"and {t['kernel_launches_per_step']} kernel launches per step; CUDA graph "
                  f"trees: {t['cudagraph_trees'] or 'nothing logged'}; counters {t['counters']}\n"
                  f"{t['top_host_ops']}",
                  flush=True)
            free(device)
    row: dict = {"batch_size": size, "shapes": len(batches), "params": params,
                 "matmul_params": rule.matmul_params if rule else None,
                 "real_token_share": round(real_share, 4)}
    gpu = device.type == "cuda"
    for name, clocks in out.items():
        secs = [c.seconds for c in clocks]
        rate = statistics.median(c.rows / c.seconds for c in clocks)
        tok = statistics.median(c.tokens / c.seconds for c in clocks)
        flops = statistics.median(c.flops / c.seconds for c in clocks)
        row[name] = {"s_per_step": [round(s / clocks[0].steps, 5) for s in secs],
                     "samples_per_s": round(rate, 1), "tokens_per_s": round(tok, 1),
                     "mean_width": round(clocks[0].tokens / clocks[0].rows, 1),
                     "model_flops_per_s": float(f"{flops:.4g}"),
                     # PaLM's MFU (ftlab.flops; padded tokens count) and the same on real
                     # tokens only; mfu_6n_total: 6 x all parameters x tokens/s, the formula
                     # of earlier runs (it counts embedding lookups as multiplications)
                     "mfu": round(flops / args.peak_flops, 4) if gpu and rule else None,
                     "mfu_real_tokens": round(real_share * flops / args.peak_flops, 4)
                     if gpu and rule else None,
                     "mfu_6n_total": round(6 * params * tok / args.peak_flops, 4) if gpu
                     else None}
    for name in variants:
        if name != "plain":
            row[f"{name}_vs_plain"] = spread([p.seconds / f.seconds for p, f in
                                              zip(out["plain"], out[name], strict=True)])
    if args.trace:
        row["trace"] = {k: {x: y for x, y in v.items() if x != "top_host_ops"}
                        for k, v in row_trace.items()}
    if args.pad128:
        row["bucketing_speedup_vs_pad128"] = spread([
            (p.seconds / p.rows) / (f.seconds / f.rows)
            for p, f in zip(out["pad128"], out["ftlab"], strict=True)])
    del models
    free(device)
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model-size", default=None, choices=["minilm", "tiny", "base"],
                        help="default: minilm on the CPU, base on cuda")
    parser.add_argument("--batch-sizes", default=None, help="comma list, e.g. 32,128,512")
    parser.add_argument("--batch-size", type=int, default=32, help="one batch size (CPU)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds (5 CPU, 3 GPU)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (40 CPU, 30 GPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (3 CPU, 5 GPU)")
    parser.add_argument("--pad-steps", type=int, default=10, help="timed steps, pad-to-128")
    parser.add_argument("--pad128", action=argparse.BooleanOptionalAction, default=None,
                        help="also time pad-to-128 batches (default: on the CPU only)")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--num-workers", type=int, default=None, help="0 CPU, 4 GPU")
    parser.add_argument("--pad-multiple", type=int, default=None, help="null CPU, 16 GPU")
    parser.add_argument("--pad-buckets", default=None,
                        help="comma list of fixed batch widths, e.g. 32,48,64,96,128")
    parser.add_argument("--compile", default=None,
                        choices=["default", "reduce-overhead", "max-autotune",
                                 "max-autotune-no-cudagraphs"],
                        help="torch.compile every variant's model with this mode")
    parser.add_argument("--max-train", type=int, default=None, help="cap the training rows")
    parser.add_argument("--peak-flops", type=float, default=989e12,
                        help="the device's peak FLOP/s for MFU (H100 dense bf16: 989e12)")
    parser.add_argument("--module", action="store_true",
                        help="also time ftlab's module in the plain loop (no Lightning loop)")
    parser.add_argument("--trace", type=int, default=0, metavar="STEPS",
                        help="after the timed rounds, profile STEPS more steps of each variant "
                             "(launches per step, CUDA graph trees' log, top host ops)")
    parser.add_argument("--json", metavar="FILE", help="also write the JSON figures here")
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    defaults = {"model_size": "base" if gpu else "minilm", "rounds": 3 if gpu else 5,
                "steps": 30 if gpu else 40, "warmup": 5 if gpu else 3,
                "num_workers": 4 if gpu else 0, "pad_multiple": 16 if gpu else None,
                "pad128": not gpu}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    sizes = [int(s) for s in (args.batch_sizes or str(args.batch_size)).split(",")]
    torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("high")
    device = torch.device("cuda" if gpu else "cpu")
    spec = loops.model_spec(args.model_size)
    loader_opts = {"num_workers": args.num_workers, "pin_memory": gpu,
                   "persistent_workers": args.num_workers > 0,
                   "pad_to_multiple_of": args.pad_multiple,
                   "pad_to_buckets": [int(w) for w in args.pad_buckets.split(",")]
                   if args.pad_buckets else None}
    if args.compile:  # every variant compiles a fresh copy: room for their graphs
        import torch._dynamo as dynamo

        dynamo.config.cache_size_limit = max(64, dynamo.config.cache_size_limit)
    task, dm, _ = rotten_setup(sizes[0], max_train=args.max_train, model=spec, **loader_opts)
    padded = rotten_setup(sizes[0], max_train=args.max_train, pad_to=128,
                          model=spec)[1] if args.pad128 else None
    name = torch.cuda.get_device_name(device) if gpu else "CPU"
    print(f"torch {torch.__version__} on {name}, model {args.model_size}, precision "
          f"{args.precision}, batches {sizes}, {args.steps} (+{args.warmup}) timed steps, "
          f"{args.rounds} rounds, workers {args.num_workers}, pad multiple "
          f"{args.pad_multiple}, buckets {args.pad_buckets}, compile {args.compile}, load "
          f"{os.getloadavg()[0]:.2f}", flush=True)

    rows = []
    for size in sizes:
        try:
            rows.append(bench_batch(args, device, size, spec, (task, dm, padded)))
        except torch.OutOfMemoryError:
            print(f"  batch {size}: out of memory", flush=True)
            rows.append({"batch_size": size, "oom": True})
        free(device)  # outside the except: its traceback holds the tensors until it ends

    print("\n| batch | shapes | plain samples/s | ftlab samples/s | ftlab/plain (range) | "
          "tokens/row | MFU plain | MFU ftlab | MFU ftlab, real tokens |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("oom"):
            print(f"| {r['batch_size']} | out of memory | | | | | | | |")
            continue
        o, p, f = r["ftlab_vs_plain"], r["plain"], r["ftlab"]
        mfu = [f"{x:.1%}" if x is not None else "-"
               for x in (p["mfu"], f["mfu"], f["mfu_real_tokens"])]
        print(f"| {r['batch_size']} | {r['shapes']} | {p['samples_per_s']:.0f} | "
              f"{f['samples_per_s']:.0f} | {o['median']:.3f} ({o['min']:.3f}-{o['max']:.3f}) | "
              f"{p['mean_width']:.1f} | {mfu[0]} | {mfu[1]} | {mfu[2]} |")
        if "module_vs_plain" in r:
            m = r["module_vs_plain"]
            print(f"  ftlab's module in the plain loop / plain: {m['median']:.3f} "
                  f"({m['min']:.3f}-{m['max']:.3f})")
        if "bucketing_speedup_vs_pad128" in r:
            b = r["bucketing_speedup_vs_pad128"]
            print(f"  bucketing vs pad-to-128 per example: {b['median']:.2f}x "
                  f"({b['min']:.2f}-{b['max']:.2f}; target >= 2x)")
    result = {"benchmark": "overhead", "torch": torch.__version__, "device": name,
              "model_size": args.model_size, "precision": args.precision,
              "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup,
              "threads": args.threads, "num_workers": args.num_workers,
              "pad_multiple": args.pad_multiple, "pad_buckets": args.pad_buckets,
              "compile": args.compile, "peak_flops": args.peak_flops,
              "timing": "wall, device-synchronised" if gpu else "process CPU time",
              "load_avg": [round(x, 2) for x in os.getloadavg()], "batches": rows}
    return emit(result, args.json)


if __name__ == "__main__":
    main()
