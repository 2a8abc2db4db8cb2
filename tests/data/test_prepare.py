import json
from collections import Counter

import pytest

from rlhf_core.config import ConfigError
from rlhf_core.data.adapters import DataError
from rlhf_core.config.views import DataSettings
from rlhf_core.data.prepare import build_data as build_settings
from rlhf_core.data.prepare import check_sources, load_split
from rlhf_core.data.splits import cut_default
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
    import numpy as np

    assert [len(p) for p in cut_default(np.arange(10), (2, 4, 4))] == [2, 4, 4]
    assert [len(p) for p in cut_default(np.arange(7), (1, 1, 1))] == [2, 3, 2]
    assert sum(map(len, cut_default(np.arange(101), (2, 4, 4)))) == 101


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


def _share_a(table) -> float:
    return Counter(r["chosen"].split()[-1][0] for r in table)["a"] / len(table)


def test_blend_without_weights_keeps_every_row(tmp_path):
    """200 and 36 SFT rows: all 236 are used once (DeepSpeed-Chat's concatenation), none oversampled."""
    a = _local(tmp_path, "a", _pairs(200, "a"))
    b = _local(tmp_path, "b", _pairs(36, "b"))
    cfg = tiny_config(tmp_path / "store", **{
        "data.sources": [{"name": "local/jsonfile", "path": a, "stages": ["sft"]},
                         {"name": "local/jsonfile", "path": b, "stages": ["sft"]},
                         {"name": "local/jsonfile", "path": _local(tmp_path, "c", _pairs(60, "c"))}]})
    built = build_data(cfg)
    sft = built.tables["sft/train"].to_pylist()
    tags = Counter(r["chosen"].split()[-1][0] for r in sft)
    assert tags["a"] == 200 and tags["b"] == 36  # every row of the SFT-only sources
    assert len({r["chosen"] for r in sft}) == len(sft)  # each once
    assert built.metrics["sources"]["1:local/jsonfile"]["blend"]["sft/train"] == {
        "rows": 36, "used": 36, "oversampled": 0, "dropped": 0}
    # The blend is shuffled: the two sources are interleaved, not one after the other.
    first = [r["chosen"].split()[-1][0] for r in sft[:60]]
    assert "b" in first and "a" in first


def test_blend_follows_weights_and_total(tmp_path):
    a = _local(tmp_path, "a", _pairs(400, "a"))
    b = _local(tmp_path, "b", _pairs(400, "b"))

    def sft(wa, wb, **extra):
        cfg = tiny_config(tmp_path / "store", **{
            "data.sources": [{"name": "local/jsonfile", "path": a, "weight": wa},
                             {"name": "local/jsonfile", "path": b, "weight": wb}], "data.split": "1,1,1", **extra})
        built = build_data(cfg)
        return built.tables["sft/train"].to_pylist(), built.metrics["sources"]

    table, sources = sft(3.0, 1.0)
    # Each source offers 133 SFT rows; 266 rows at 3:1 are 200 of a (67 oversampled) and 66 of b (67 dropped).
    assert len(table) == 266 and _share_a(table) == 200 / 266
    assert sources["0:local/jsonfile"]["blend"]["sft/train"] == {"rows": 133, "used": 133, "oversampled": 67, "dropped": 0}
    assert sources["1:local/jsonfile"]["blend"]["sft/train"] == {"rows": 133, "used": 66, "oversampled": 0, "dropped": 67}
    # Negative control: equal weights give half and half; the weights, not the order, decide.
    table, _ = sft(1.0, 1.0)
    assert _share_a(table) == 0.5
    table, _ = sft(1.0, 3.0, **{"data.blend_total.sft": 100})
    assert len(table) == 100 and _share_a(table) == 0.25


def test_sft_only_sources_feed_sft_and_ppo_but_not_reward(tmp_path):
    sft_only = tmp_path / "zhihu.jsonl"
    sft_only.write_text("".join(json.dumps({"INSTRUCTION": f"describe the dog {i}", "RESPONSE": "the dog is kind ."}) + "\n"
                                for i in range(60)))
    pairs = _local(tmp_path, "pairs", _pairs(60, "p"))
    cfg = tiny_config(tmp_path / "store", **{"data.sources": [
        {"name": "wangrui6/Zhihu-KOL", "path": str(sft_only)}, {"name": "local/jsonfile", "path": pairs}],
        "data.split": "1,1,1"})
    built = build_data(cfg)
    assert {r["source"] for r in built.tables["reward/train"].to_pylist()} == {"local/jsonfile"}
    assert {r["source"] for r in built.tables["sft/train"].to_pylist()} == {"local/jsonfile", "wangrui6/Zhihu-KOL"}
    assert built.metrics["sources"]["0:wangrui6/Zhihu-KOL"]["reward"]["train_dropped_no_rejected"] > 0


def test_a_source_can_feed_only_sft(tmp_path):
    """DeepSpeed-Chat's --sft_only_data_path: stages: [sft] puts every row of it in SFT and none elsewhere."""
    only = _local(tmp_path, "only", _pairs(50, "s"), _pairs(10, "s"))
    cfg = tiny_config(tmp_path / "store", **{"data.sources": [
        {"name": "local/jsonfile", "path": only, "stages": ["sft"]},
        {"name": "local/jsonfile", "path": _local(tmp_path, "p", _pairs(60, "p"))}]})
    built = build_data(cfg)
    by_stage = {name: Counter(r["chosen"].split()[-1][0] for r in t.to_pylist()) for name, t in built.tables.items()
                if not name.startswith("ptx")}
    assert by_stage["sft/train"]["s"] == 50 and by_stage["sft/eval"]["s"] == 10
    assert all(c["s"] == 0 for name, c in by_stage.items() if not name.startswith("sft"))


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
        ("wrong_type", r"row 8 \(line 8\): column 'chosen' is int \(42\), expected str"),
        ("equal", r"row 4 \(line 4\): chosen equals rejected"),
    ],
)
def test_bad_source_is_named_and_writes_nothing(tmp_path, kind, message):
    cfg = tiny_config(tmp_path / "store", **{"data.sources": [{"name": "local/jsonfile", "path": _bad_source(tmp_path, kind)}]})
    with pytest.raises(DataError, match=message):
        prepare(cfg)
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*"))


def test_invalid_rows_can_be_dropped_and_counted(tmp_path):
    """A bad pair drops the pair only: the row still serves sft and rl (DeepSpeed-Chat uses its prompt in step 3)."""
    src = _bad_source(tmp_path, "equal")
    cfg = tiny_config(tmp_path / "store", **{
        "data.sources": [{"name": "local/jsonfile", "path": src, "on_invalid": "drop"}], "data.split": "1,1,1"})
    built = build_data(cfg)
    stats = built.metrics["sources"]["0:local/jsonfile"]
    assert stats["invalid_dropped"] == {"pairs": {"chosen_equals_rejected": 1}}
    assert stats["rows"]["train"] == 21  # no row lost
    rows = [r for t in built.tables.values() for r in t.to_pylist() if "text" not in r]
    assert all(r["rejected"] != r["chosen"] for r in rows)


def test_a_bad_answer_keeps_the_prompt_for_rl(tmp_path):
    d = tmp_path / "src"
    (d / "data").mkdir(parents=True)
    good = {"prompt": "Human: describe the cat . Assistant:", "chosen": "the cat is kind .", "rejected": "it is rude ."}
    rows = [{**good, "chosen": f"the cat is kind . {i}"} for i in range(30)] + [{**good, "prompt": "Human: describe the dog . Assistant:", "chosen": 42}]
    (d / "data" / "train.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "data" / "eval.json").write_text((json.dumps(good) + "\n") * 6)
    cfg = tiny_config(tmp_path / "store", **{"data.sources": [{"name": "local/jsonfile", "path": str(d), "on_invalid": "drop"}],
                                             "data.split": "0,0,1"})
    built = build_data(cfg)
    assert built.metrics["sources"]["0:local/jsonfile"]["invalid_dropped"] == {"answers": {"wrong_type": 1}}
    rl = built.tables["rl/train"].to_pylist()
    dog = [r for r in rl if "dog" in r["prompt"]]
    assert len(dog) == 1 and dog[0]["chosen"] is None and dog[0]["rejected"] is None


def test_a_step_no_source_feeds_is_empty_and_named(tmp_path):
    cfg = tiny_config(tmp_path / "store", **{"data.split": "1,0,1"})
    m = prepare(cfg)
    assert m.metrics["stages_without_sources"] == ["reward"] and m.metrics["rows"]["reward/train"] == 0
    with pytest.raises(DataError, match=r"has no reward/train rows: no source feeds the reward step"):
        load_split(Store.from_config(cfg.storage), m, "reward/train")
    assert len(load_split(Store.from_config(cfg.storage), m, "sft/train")) > 0
    with pytest.raises(DataError, match=r"no source feeds the reward step \(data.split is 1,0,1; .*--until"):
        check_sources(cfg.data, {"sft", "reward"})
    check_sources(cfg.data, {"sft"})  # a run up to sft needs no reward data


def test_a_fed_step_that_ends_up_empty_stops_the_stage(tmp_path):
    sft_only = tmp_path / "zhihu.jsonl"
    sft_only.write_text("".join(json.dumps({"INSTRUCTION": f"q {i}", "RESPONSE": "a ."}) + "\n" for i in range(30)))
    cfg = tiny_config(tmp_path / "store", **{"data.sources": [{"name": "wangrui6/Zhihu-KOL", "path": str(sft_only)}]})
    with pytest.raises(DataError, match=r"leaves the reward stage's train set empty .*no_rejected.* give reward a larger share"):
        prepare(cfg)
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*.arrow"))


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
