"""Length-grouped batching and dynamic padding."""

from __future__ import annotations

import random

from ftlab.data.batching import LengthGroupedBatchSampler, PadCollator


def test_each_index_once_per_epoch_and_new_order_each_epoch():
    lengths = [random.Random(i).randint(3, 120) for i in range(1000)]
    sampler = LengthGroupedBatchSampler(lengths, batch_size=32, seed=0)
    first = list(sampler)
    second = list(sampler)
    assert sorted(i for b in first for i in b) == list(range(1000))
    assert len(first) == len(sampler)
    assert first != second


def test_grouping_pads_far_less_than_random_batches():
    rng = random.Random(0)
    lengths = [rng.randint(3, 120) for _ in range(3000)]

    def padded(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    grouped = padded(list(LengthGroupedBatchSampler(lengths, batch_size=32, seed=0)))
    idx = list(range(3000))
    rng.shuffle(idx)
    plain = padded([idx[i : i + 32] for i in range(0, 3000, 32)])
    assert grouped < 0.75 * plain
    assert grouped < 1.1 * sum(lengths)


def test_eval_order_is_sorted_and_complete():
    lengths = [5, 50, 7, 30, 1]
    batches = list(LengthGroupedBatchSampler(lengths, batch_size=2, shuffle=False))
    assert batches == [[1, 3], [2, 0], [4]]


def test_collator_pads_to_longest_in_batch():
    rows = [{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": 0, "length": 3},
            {"input_ids": [1], "attention_mask": [1], "labels": 1, "length": 1}]
    batch = PadCollator(pad_id=9)(rows)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [1, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [0, 1]
    assert "length" not in batch
    fixed = PadCollator(pad_id=9, pad_to=8)(rows)
    assert fixed["input_ids"].tolist() == [[1, 2, 3, 9, 9, 9, 9, 9], [1, 9, 9, 9, 9, 9, 9, 9]]
    assert fixed["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [1] + [0] * 7]
    assert fixed["labels"].tolist() == [0, 1]
