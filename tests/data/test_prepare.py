import json
from collections import Counter

import pytest

from rlhf_core.config import ConfigError
from rlhf_core.data.adapters import DataError
from rlhf_core.config.views import DataSettings
from rlhf_core.data.prepare import build_data as build_settings
from rlhf_core.data.prepare import load_split, split_by_shares
from rlhf_core.stages import registry
from rlhf_core.storage.store import Store
from tests.conftest import PROJECT, tiny_config
from tests.helpers import prepare


def build_data(cfg):
    return build_settings(DataSettings.from_config(cfg))


def data_stage_key(cfg):
    return registry.key(registry.DATA, cfg)


def _local(tmp_path, name, rows, eval_rows=None):
    d = tmp_path / name
    (d / "data").mkdir(parents=True)
    (d / "data" / "train.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "data" / "eval.json").write_text("".join(json.dumps(r) + "\n" for r in (eval_rows or rows[:5])))
    return str(d)


def _pairs(n, tag):
    return [{"prompt": "Human: describe the cat . Assistant:", "chosen": f"the cat is kind . {tag}{i}",
             "rejected": f"the cat is rude . {tag}{i}"} for i in range(n)]


def test_split_by_shares():
    assert [len(p) for p in split_by_shares(list(range(10)), (2, 4, 4))] == [2, 4, 4]
    assert [len(p) for p in split_by_shares(list(range(7)), (1, 1, 1))] == [2, 3, 2]
    assert sum(map(len, split_by_shares(list(range(101)), (2, 4, 4)))) == 101


def test_tiny_data_stage_splits_without_overlap(tmp_path):
    cfg = tiny_config(tmp_path)
    built = build_data(cfg)
    rows = {name: t.to_pylist() for name, t in built.tables.items()}
    assert {n: len(r) for n, r in rows.items() if n.endswith("train")} == {
        "sft/train": 800, "reward/train": 1600, "rl/train": 1600, "ptx/train": 2700}
    key = lambda r: (r["prompt"].strip(), r["chosen"].strip(), r["rejected"].strip())  # noqa: E731
    used = Counter(key(r) for s in ("sft", "reward", "rl") for r in rows[f"{s}/train"])
    source = Counter(key(json.loads(line)) for line in
                     (PROJECT / "data" / "tiny_task" / "data" / "train.json").read_text().splitlines())
    assert sum(used.values()) == 4000 and not used - source  # every source row goes to one stage at most


def test_blend_follows_weights(tmp_path):
    a = _local(tmp_path, "a", _pairs(400, "a"))
    b = _local(tmp_path, "b", _pairs(400, "b"))
    cfg = tiny_config(tmp_path / "store", **{
        "data.sources": [{"name": "local/jsonfile", "path": a, "weight": 3.0},
                         {"name": "local/jsonfile", "path": b, "weight": 1.0}],
        "data.split": "1,1,1", "data.blend": "first_exhausted"})
    table = build_data(cfg).tables["sft/train"].to_pylist()
    share_a = Counter(r["chosen"].split()[-1][0] for r in table)["a"] / len(table)
    assert 0.65 < share_a < 0.85, share_a  # 3:1 weights -> about 0.75
    # Equal weights flip it to about half: the weights, not the order, decide.
    cfg2 = tiny_config(tmp_path / "store", **{
        "data.sources": [{"name": "local/jsonfile", "path": a, "weight": 1.0},
                         {"name": "local/jsonfile", "path": b, "weight": 1.0}], "data.split": "1,1,1"})
    table2 = build_data(cfg2).tables["sft/train"].to_pylist()
    share_a2 = Counter(r["chosen"].split()[-1][0] for r in table2)["a"] / len(table2)
    assert 0.4 < share_a2 < 0.6, share_a2


def test_sft_only_sources_feed_sft_and_ppo_but_not_reward(tmp_path):
    sft_only = tmp_path / "zhihu.jsonl"
    sft_only.write_text("".join(json.dumps({"INSTRUCTION": f"describe the dog {i}", "RESPONSE": "the dog is kind ."}) + "\n"
                                for i in range(60)))
    pairs = _local(tmp_path, "pairs", _pairs(60, "p"))
    cfg = tiny_config(tmp_path / "store", **{"data.sources": [
        {"name": "wangrui6/Zhihu-KOL", "path": str(sft_only)}, {"name": "local/jsonfile", "path": pairs}],
        "data.split": "1,1,1", "data.blend": "all_exhausted"})
    built = build_data(cfg)
    assert {r["source"] for r in built.tables["reward/train"].to_pylist()} == {"local/jsonfile"}
    assert {r["source"] for r in built.tables["sft/train"].to_pylist()} == {"local/jsonfile", "wangrui6/Zhihu-KOL"}
    assert built.metrics["sources"]["0:wangrui6/Zhihu-KOL"]["reward"]["train_dropped_no_rejected"] > 0


def test_long_prompts_are_dropped_and_counted(tmp_path):
    rows = _pairs(50, "x") + [{"prompt": "Human: " + "the cat " * 20 + ". Assistant:", "chosen": "a", "rejected": "b"}] * 30
    src = _local(tmp_path, "long", rows)
    cfg = tiny_config(tmp_path / "store", **{"data.sources": [{"name": "local/jsonfile", "path": src}],
                                             "data.split": "1,1,1"})
    m = prepare(cfg)
    assert m.metrics["prompts_dropped_too_long"] > 0
    rl = load_split(Store.from_config(cfg.storage), m, "rl/train")
    assert all(len(r["prompt"].split()) <= 16 for r in rl)


# ------------------------------------------------------------------------------------------ bad input


def _bad_source(tmp_path, kind):
    d = tmp_path / "bad"
    (d / "data").mkdir(parents=True)
    good = {"prompt": "Human: describe the cat . Assistant:", "chosen": "the cat is kind .", "rejected": "it is rude ."}
    rows = [good] * 20
    if kind == "misnamed":
        rows = [{"question": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]
    elif kind == "wrong_type":
        rows = rows[:7] + [{**good, "chosen": 42}] + rows[7:]
    elif kind == "equal":
        rows = rows[:3] + [{**good, "rejected": good["chosen"]}] + rows[3:]
    text = "".join(json.dumps(r) + "\n" for r in rows).encode()
    if kind == "empty":
        text = b""
    if kind == "undecodable":
        text = text + b'{"prompt": "caf\xe9", "chosen": "x", "rejected": "y"}\n'
    (d / "data" / "train.json").write_bytes(text)
    (d / "data" / "eval.json").write_text((json.dumps(good) + "\n") * 6)
    return str(d)


@pytest.mark.parametrize(
    "kind, message",
    [
        ("misnamed", r"missing column\(s\) \['prompt'\]; found \['chosen', 'question', 'rejected'\]"),
        ("empty", r"bad/data/train.json has no rows"),
        ("undecodable", r"train.json: line 21 is not valid UTF-8 .*re-encode the file as UTF-8"),
        ("wrong_type", r"row 7: column 'chosen' is int \(42\), expected str"),
        ("equal", r"row 3: chosen equals rejected"),
    ],
)
def test_bad_source_is_named_and_writes_nothing(tmp_path, kind, message):
    cfg = tiny_config(tmp_path / "store", **{"data.sources": [{"name": "local/jsonfile", "path": _bad_source(tmp_path, kind)}]})
    with pytest.raises(DataError, match=message):
        prepare(cfg)
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*"))


def test_invalid_rows_can_be_dropped_and_counted(tmp_path):
    src = _bad_source(tmp_path, "equal")
    cfg = tiny_config(tmp_path / "store", **{
        "data.sources": [{"name": "local/jsonfile", "path": src, "on_invalid": "drop"}], "data.split": "1,1,1"})
    built = build_data(cfg)
    assert built.metrics["sources"]["0:local/jsonfile"]["invalid_dropped"] == {"chosen_equals_rejected": 1}


def test_split_that_empties_a_stage(tmp_path):
    cfg = tiny_config(tmp_path / "store", **{"data.split": "1,0,1"})
    with pytest.raises(DataError, match=r"split 1,0,1 leaves the reward stage's train set empty .* give reward a larger share"):
        prepare(cfg)
    assert not (tmp_path / "store").exists()


def test_non_positive_weight_is_refused_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match=r"data.sources.0.weight: Input should be greater than 0"):
        tiny_config(tmp_path, **{"data.sources.0.weight": 0})


def test_key_follows_content_not_location(tmp_path):
    import shutil

    from tests.conftest import PROJECT

    copy = tmp_path / "copy"
    shutil.copytree(PROJECT / "data" / "tiny_task", copy)
    base = tiny_config(tmp_path)
    moved = tiny_config(tmp_path, **{"data.sources.0.path": str(copy)})
    assert data_stage_key(base) == data_stage_key(moved)
    with open(copy / "data" / "train.json", "a") as f:
        f.write(json.dumps({"prompt": "Human: x Assistant:", "chosen": "a", "rejected": "b"}) + "\n")
    assert data_stage_key(moved) != data_stage_key(base)
    assert data_stage_key(tiny_config(tmp_path, **{"data.sources.0.weight": 2.0})) != data_stage_key(base)
