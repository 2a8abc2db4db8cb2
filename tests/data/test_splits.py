"""Which rows each step gets: the default scheme, DeepSpeed-Chat's scheme (against a transcription of its
data_utils procedure), and the blends."""

import json
import random

import numpy as np
import pytest

from rlhf_core.config.views import DataSettings
from rlhf_core.data.prepare import build_data
from rlhf_core.data.splits import (blend_default, blend_targets, cut_deepspeed_chat, cut_default,
                                   deepspeed_chat_bounds, deepspeed_chat_permutation, seeded_rng, shuffled)
from tests.conftest import tiny_config


def test_deepspeed_chat_bounds_round_each_share_and_give_the_difference_to_the_first():
    # 7 rows, 1,1,1: each share rounds to 2 (sum 6), so every boundary moves up by one: 3/2/2.
    assert deepspeed_chat_bounds(7, (1, 1, 1)) == [0, 3, 5, 7]
    # 5 rows, 1,1: 2.5 rounds to 2 (half to even), the first share takes the difference: 3/2.
    assert deepspeed_chat_bounds(5, (1, 1)) == [0, 3, 5]
    # 11 rows, 2,4,4: 2.2 -> 2, 4.4 -> 4, 4.4 -> 4 (sum 10): 3/4/4.
    assert deepspeed_chat_bounds(11, (2, 4, 4)) == [0, 3, 7, 11]
    assert deepspeed_chat_bounds(10, (2, 0, 0)) == [0, 10, 10, 10]  # DeepSpeed-Chat's SFT-only "10,0,0"
    # The default scheme rounds the cumulative sums instead: 7 rows 1,1,1 -> 2/3/2.
    assert [len(p) for p in cut_default(np.arange(7), (1, 1, 1))] == [2, 3, 2]


def test_deepspeed_chat_permutation_is_numpy_randomstate():
    # np.random.RandomState(1234).shuffle(np.arange(10, dtype=np.uint32)); RandomState's stream is frozen by NumPy.
    assert deepspeed_chat_permutation(1234, 10).tolist() == [7, 2, 9, 1, 0, 8, 4, 5, 6, 3]
    assert [p.tolist() for p in cut_deepspeed_chat(10, (2, 4, 4), 1234)] == [[7, 2], [9, 1, 0, 8], [4, 5, 6, 3]]
    assert deepspeed_chat_permutation(1235, 10).tolist() != [7, 2, 9, 1, 0, 8, 4, 5, 6, 3]


def test_eval_carve_shares_equal_deepspeed_chats_9_1():
    for n in (1, 7, 10, 15, 99, 1001):
        assert deepspeed_chat_bounds(n, (1 - 0.1, 0.1)) == deepspeed_chat_bounds(n, (9, 1))


def test_the_default_shuffle_is_pythons_list_shuffle_on_an_index_array():
    ids = np.arange(1000) * 3
    expect = list(ids)
    seeded_rng(5, "x").shuffle(expect)
    assert shuffled(ids, seeded_rng(5, "x")).tolist() == expect
    assert shuffled(ids, seeded_rng(6, "x")).tolist() != expect  # negative control


def test_blend_targets_by_largest_remainder():
    assert blend_targets([200, 36], None, None) == [200, 36]  # no weights: every row once
    assert blend_targets([200, 36], [1, 1], None) == [118, 118]
    assert blend_targets([200, 36], [3, 1], 10) == [8, 2]  # 7.5 / 2.5: the tie goes to the earlier source
    assert blend_targets([200, 0, 36], [1, 5, 1], 10) == [5, 0, 5]  # a source with no rows takes no share
    assert blend_targets([50, 50], None, 30) == [15, 15]


def test_blend_repeats_whole_passes_then_a_prefix():
    a, b = np.array([1, 2, 3]), np.array([10, 20, 30, 40])
    ids, uses = blend_default([a, b], [2, 1], 12, random.Random(0))
    assert sorted(ids.tolist()) == sorted([1, 2, 3] * 2 + [1, 2] + [10, 20, 30, 40])
    assert [u.oversampled for u in uses] == [5, 0] and [u.dropped for u in uses] == [0, 0]
    one, _ = blend_default([a], None, None, random.Random(0))
    assert one.tolist() == [1, 2, 3]  # one source once: its order is kept


# ----------------------------------------------------------- DeepSpeed-Chat's rows, end to end


def _ds_shuffle(seed, n):
    idx = np.arange(n, dtype=np.uint32)
    np.random.RandomState(seed=seed).shuffle(idx)
    return idx.tolist()


def _ds_split_index(seed, data_split, split_index, n):
    """data_utils.get_raw_dataset_split_index, as its code reads."""
    splits = [float(s) for s in data_split.split(",")]
    splits = [s / sum(splits) for s in splits]
    bounds = [0]
    for i, s in enumerate(splits):
        bounds.append(bounds[i] + int(round(s * float(n))))
    diff = bounds[-1] - n
    for i in range(1, len(bounds)):
        bounds[i] -= diff
    return _ds_shuffle(seed, n)[bounds[split_index]:bounds[split_index + 1]]


def _ds_reference(sources, data_split, seed, phase, split):
    """create_prompt_dataset for one phase: sources = [(train rows, eval rows or None, sft_only)]; rows are
    dicts with tag/has_rejected/long; returns the tags in DeepSpeed-Chat's order."""
    def usable(r):
        return {1: True, 2: r["has_rejected"], 3: not r["long"]}[phase]

    def create(train, evals, split_str):
        if evals is None:  # get_train_data / get_eval_data of a dataset without an eval split
            train, evals = ([train[i] for i in _ds_split_index(seed, "9,1", k, len(train))] for k in (0, 1))
        rows = train if split == "train" else evals
        return [rows[i] for i in _ds_split_index(seed, split_str, phase - 1, len(rows)) if usable(rows[i])]

    main = [create(t, e, data_split) for t, e, only in sources if not only]
    data = main[0] if len(main) == 1 else [x for d in main for x in d]
    if len(main) > 1:
        data = [data[i] for i in _ds_shuffle(seed, len(data))]
    if phase == 1 and any(only for *_x, only in sources):
        extra = [x for t, e, only in sources if only for x in create(t, e, "10,0,0")]
        data = data + extra
        data = [data[i] for i in _ds_shuffle(seed, len(data))]
    return [r["tag"] for r in data]


def _rows(tag, n, rng):
    out = []
    for i in range(n):
        long, has_rejected = rng.random() < 0.15, rng.random() < 0.8
        out.append({"tag": f"{tag}{i}", "long": long, "has_rejected": has_rejected})
    return out


def _prompt(r):
    return ("describe the cat " * 12 if r["long"] else "describe the cat") + f" . {r['tag']}"


@pytest.mark.parametrize("seed, data_split, with_b", [(1234, "2,4,4", True), (7, "3,3,4", True), (42, "1,1,1", False)])
def test_deepspeed_chat_scheme_gives_exactly_its_rows_in_its_order(tmp_path, seed, data_split, with_b):
    """with_b False: one main source, which DeepSpeed-Chat does not permute again (only with its SFT-only data)."""
    rng = random.Random(seed)
    a_train, a_eval, b_train, c_train = _rows("a", 37, rng), _rows("e", 9, rng), _rows("b", 23, rng), _rows("c", 15, rng)
    for r in c_train:
        r["has_rejected"] = False
    for r in b_train:
        r["has_rejected"] = True
    # A: DeepSpeed-Chat's local/jsonfile (train.json + eval.json); B: a dataset without an eval split ("9,1"
    # carve-out); C: SFT-only (--sft_only_data_path).
    (tmp_path / "a" / "data").mkdir(parents=True)
    for name, rows in (("train", a_train), ("eval", a_eval)):
        (tmp_path / "a" / "data" / f"{name}.json").write_text("".join(json.dumps(
            {"prompt": f"Human: {_prompt(r)} Assistant:", "chosen": f"kind {r['tag']}",
             **({"rejected": f"rude {r['tag']}"} if r["has_rejected"] else {})}) + "\n" for r in rows))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(
        {"prompt": _prompt(r), "chosen": f"kind {r['tag']}", "rejected": f"rude {r['tag']}"}) + "\n" for r in b_train))
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(
        {"INSTRUCTION": _prompt(r), "RESPONSE": f"kind {r['tag']}"}) + "\n" for r in c_train))
    cfg = tiny_config(tmp_path / "store", **{
        "data.split_scheme": "deepspeed_chat", "data.seed": seed, "data.split": data_split,
        "data.sources": [{"name": "local/jsonfile", "path": str(tmp_path / "a")}]
        + ([{"name": "Dahoas/synthetic-instruct-gptj-pairwise", "path": str(tmp_path / "b.jsonl")}] if with_b else [])
        + [{"name": "wangrui6/Zhihu-KOL", "path": str(tmp_path / "c.jsonl"), "stages": ["sft"]}]})
    tables = build_data(DataSettings.from_config(cfg)).tables
    sources = [(a_train, a_eval, False)] + ([(b_train, None, False)] if with_b else []) + [(c_train, None, True)]
    for phase, stage in ((1, "sft"), (2, "reward"), (3, "rl")):
        for split in ("train", "eval"):
            got = [r["chosen"].split()[-1] for r in tables[f"{stage}/{split}"].to_pylist()]
            assert got == _ds_reference(sources, data_split, seed, phase, split), f"{stage}/{split}"
    # Negative control: the default scheme puts other rows in each step (overlap at chance).
    default = build_data(DataSettings.from_config(tiny_config(tmp_path / "store", **{
        "data.seed": seed, "data.split": data_split, "data.sources": cfg.model_dump(mode="json")["data"]["sources"]}))).tables
    assert [r["chosen"] for r in default["sft/train"].to_pylist()] != [r["chosen"] for r in tables["sft/train"].to_pylist()]
