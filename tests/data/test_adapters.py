"""Each adapter maps a small sample in its source's public layout to the expected canonical rows."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhf_core.config import SourceConfig
from rlhf_core.data.adapters import LAYOUTS, DataError, source_readers, supported_sources
from rlhf_core.data.convert import canonical_rows

H = lambda q: f" Human: {q} Assistant:"  # noqa: E731

CASES = {
    "Dahoas/rm-static": (
        {"prompt": "\n\nHuman: hi\n\nAssistant:", "response": " yo", "chosen": " hello", "rejected": " go away"},
        ("\n\nHuman: hi\n\nAssistant:", " hello", " go away"),
    ),
    "Dahoas/full-hh-rlhf": (
        {"prompt": "\n\nHuman: a\n\nAssistant:", "response": "r", "chosen": " b", "rejected": " c"},
        ("\n\nHuman: a\n\nAssistant:", " b", " c"),
    ),
    "Dahoas/synthetic-instruct-gptj-pairwise": (
        {"prompt": "Name a fruit", "chosen": "Apple", "rejected": "Car"},
        (H("Name a fruit"), " Apple", " Car"),
    ),
    "yitingxie/rlhf-reward-datasets": (
        {"prompt": "Human: q? ", "chosen": "Human: q? Assistant: good", "rejected": "Human: q? Assistant: bad"},
        ("Human: q? Assistant:", " good", " bad"),
    ),
    "openai/webgpt_comparisons": (
        {"question": {"full_text": "Why?"}, "quotes_0": {}, "answer_0": "Because [1] so.", "tokens_0": [],
         "score_0": -1.0, "quotes_1": {}, "answer_1": "Gravity (Newton) works.", "tokens_1": [], "score_1": 1.0},
        (H("Why?"), " Gravity works.", " Because so."),
    ),
    "stanfordnlp/SHP": (
        {"post_id": "x", "history": "Best pet?", "human_ref_A": "Cats", "human_ref_B": "Rocks", "labels": 1},
        (H("Best pet?"), " Cats", " Rocks"),
    ),
    "pvduy/sharegpt_alpaca_oa_vicuna_format": (
        {"prompt": "USER: hi ASSISTANT:", "label": "hello"},
        ("Human: hi Assistant:", " hello", None),
    ),
    "wangrui6/Zhihu-KOL": (
        {"INSTRUCTION": "你好吗", "RESPONSE": "很好", "SOURCE": "z", "METADATA": "{}"},
        (H("你好吗"), " 很好", None),
    ),
    "Cohere/miracl-zh-queries-22-12": (
        {"query_id": "1", "query": "北京?", "positive_passages": [{"docid": "a", "text": "首都", "title": "t"}],
         "negative_passages": [{"docid": "b", "text": "城市", "title": "t"}]},
        (H("北京?"), " 首都", " 城市"),
    ),
    "Hello-SimpleAI/HC3-Chinese": (
        {"id": "1", "question": "什么?", "human_answers": ["人"], "chatgpt_answers": ["机"]},
        (H("什么?"), " 人", None),
    ),
    "mkqa-Chinese": (
        {"example_id": 1, "queries": {"zh_cn": "谁?", "ja": "誰?"},
         "answers": {"zh_cn": [{"type": 0, "text": "我"}], "ja": [{"type": 0, "text": "私"}]}},
        (H("谁?"), " 我", None),
    ),
    "mkqa-Japanese": (
        {"example_id": 1, "queries": {"zh_cn": "谁?", "ja": "誰?"},
         "answers": {"zh_cn": [{"type": 0, "text": "我"}], "ja": [{"type": 0, "text": "私"}]}},
        (H("誰?"), " 私", None),
    ),
    "Cohere/miracl-ja-queries-22-12": (
        {"query_id": "1", "query": "東京?", "positive_passages": [{"docid": "a", "text": "首都", "title": "t"}],
         "negative_passages": []},
        (H("東京?"), " 首都", None),
    ),
    "lmqg/qg_jaquad": (
        {"answer": "a", "paragraph_question": "pq", "question": "何?", "sentence": "文です", "paragraph": "p"},
        (H("何?"), " 文です", None),
    ),
    "lmqg/qag_jaquad": (
        {"paragraph": "段落", "questions": ["質問?"], "answers": ["答"], "questions_answers": "x"},
        (H("質問?"), " 段落", None),
    ),
}


def test_every_deepspeed_chat_source_has_a_case():
    assert set(CASES) | {"local/jsonfile", "Anthropic/hh-rlhf"} == set(LAYOUTS)
    assert "files" in supported_sources()


@pytest.mark.parametrize("name", sorted(CASES))
def test_layout_maps_sample_to_canonical_rows(name, tmp_path):
    raw, (prompt, chosen, rejected) = CASES[name]
    folder = tmp_path / "src"
    folder.mkdir()
    layout = LAYOUTS[name]
    (folder / f"{layout.train_split}.jsonl").write_text(json.dumps(raw, ensure_ascii=False) + "\n")
    if layout.eval_split:
        (folder / f"{layout.eval_split}.jsonl").write_text(json.dumps(raw, ensure_ascii=False) + "\n")
    src = SourceConfig(name=name, path=str(folder))
    rows = canonical_rows(src)
    assert rows == [{"prompt": prompt, "chosen": chosen, "rejected": rejected, "source": name}]
    assert bool(source_readers(src).eval) == bool(layout.eval_split)


def test_deepspeed_chat_local_jsonfile_layout(tmp_path):
    (tmp_path / "data").mkdir()
    row = {"prompt": "Human: q Assistant:", "chosen": "yes", "rejected": "no"}
    (tmp_path / "data" / "train.json").write_text(json.dumps([row]))  # a JSON array works too
    (tmp_path / "data" / "eval.json").write_text(json.dumps(row) + "\n")
    src = SourceConfig(name="local/jsonfile", path=str(tmp_path))
    expect = [{"prompt": " Human: q Assistant:", "chosen": " yes", "rejected": " no", "source": "local/jsonfile"}]
    assert canonical_rows(src) == expect
    assert canonical_rows(src, "eval") == expect


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv"])
def test_generic_files_with_column_mapping(fmt, tmp_path):
    rows = [{"q": "What is 2+2?", "good": "4", "bad": "5"}, {"q": " Human: hi Assistant:", "good": "hey", "bad": "no"}]
    path = tmp_path / f"pairs.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("q,good,bad\n" + "".join(f'"{r["q"]}",{r["good"]},{r["bad"]}\n' for r in rows))
    src = SourceConfig(name="files", path=str(path), columns={"prompt": "q", "chosen": "good", "rejected": "bad"})
    got = canonical_rows(src)
    assert got[0] == {"prompt": H("What is 2+2?"), "chosen": " 4", "rejected": " 5", "source": "files"}
    assert got[1]["prompt"] == " Human: hi Assistant:"  # already in the format: kept


def test_files_on_the_store_url(s3_server):
    import fsspec

    with fsspec.open("s3://rlhf-test/raw/pairs.jsonl", "w") as f:
        f.write(json.dumps({"q": "x", "a": "y"}) + "\n")
    src = SourceConfig(name="files", path="s3://rlhf-test/raw/pairs.jsonl", columns={"prompt": "q", "chosen": "a"})
    assert canonical_rows(src)[0]["chosen"] == " y"


def test_hub_name_without_a_hub_says_how_to_fix():
    with pytest.raises(DataError, match="could not load 'Dahoas/rm-static' from the hub.*point path:"):
        source_readers(SourceConfig(name="Dahoas/rm-static"))
