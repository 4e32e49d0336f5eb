"""benchmarks/packing.py times packed rows against bucketed ones; its figures mean something only
if a packed review is classified exactly as it would be alone. Checked on a tiny BERT on the CPU."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from transformers import BertConfig, BertForSequenceClassification

from benchmarks.packing import Packed, first_fit, packed_batch, packed_logits, packed_loss
from ftlab.compiling import compile_model


def _rows(n: int, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(3, 20, (1,), generator=gen))
        body = torch.randint(5, 90, (length - 2,), generator=gen).tolist()
        rows.append({"input_ids": [1, *body, 2], "labels": int(torch.randint(0, 3, (1,),
                                                                            generator=gen))})
    return rows


def test_first_fit_packs_every_row_once_within_the_width():
    lengths = [len(r["input_ids"]) for r in _rows(60)]
    packs = first_fit(lengths, 32)
    assert sorted(i for p in packs for i in p) == list(range(60))
    assert all(sum(lengths[i] for i in p) <= 32 for p in packs)
    assert len(packs) <= -(-sum(lengths) // 32) + 2  # about as few packs as the tokens need
    with pytest.raises(ValueError, match="does not fit"):
        first_fit([40], 32)


def test_a_packed_review_gets_the_logits_and_loss_it_gets_alone():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, num_labels=3)
    config._attn_implementation = "sdpa"
    model = BertForSequenceClassification(config).eval()  # no dropout: the same numbers
    rows = _rows(12)
    packs = first_fit([len(r["input_ids"]) for r in rows], 48)
    assert max(len(p) for p in packs) > 1  # reviews really share rows
    batch = packed_batch(rows, packs, 48, max(len(p) for p in packs), pad_id=0)
    with torch.no_grad():
        logits = packed_logits(model, batch)
        alone = {i: model(input_ids=torch.tensor([rows[i]["input_ids"]])).logits[0]
                 for p in packs for i in p}
        loss = packed_loss(Packed(model), batch)
    order = [i for p in packs for i in p]
    real = batch["labels"].reshape(-1) != -100
    assert int(real.sum()) == len(rows)
    torch.testing.assert_close(logits[real], torch.stack([alone[i] for i in order]),
                               rtol=1e-4, atol=1e-5)
    labels = torch.tensor([rows[i]["labels"] for i in order])
    torch.testing.assert_close(loss, F.cross_entropy(torch.stack([alone[i] for i in order]),
                                                     labels), rtol=1e-4, atol=1e-5)


def test_the_packed_step_compiles_as_one_graph():
    """What ``--compile reduce-overhead`` needs on the GPU: the packed forward (mask, gathers,
    pooler, classifier) captured with ``fullgraph`` (a break raises), checked with torch's
    eager backend (no kernels built) on the CPU, giving the eager logits."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, num_labels=3)
    config._attn_implementation = "sdpa"
    model = BertForSequenceClassification(config).eval()
    rows = _rows(8, seed=1)
    packs = first_fit([len(r["input_ids"]) for r in rows], 48)
    batch = packed_batch(rows, packs, 48, max(len(p) for p in packs), pad_id=0)
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "segment_ids", "starts")}
    with torch.no_grad():
        eager = packed_logits(model, batch)
        compiled = compile_model(Packed(model), "reduce-overhead", backend="eager")(**inputs)
    torch.testing.assert_close(compiled, eager)
