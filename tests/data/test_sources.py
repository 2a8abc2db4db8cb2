"""Sources as users have them: HH-RLHF's repository as shipped, TRL's and OpenAI's formats without a column
map, and the errors a wrong column map gives."""

import gzip
import json

import pytest

from rlhf_core.config import ConfigError, SourceConfig
from rlhf_core.data.adapters import DataError, source_files
from rlhf_core.data.convert import canonical_rows
from rlhf_core.data.formats import render_prompt, to_messages
from rlhf_core.data.prepare import check_sources
from rlhf_core.stages import registry
from tests.conftest import tiny_config
from tests.data.test_formats import TOK


def _hh(prompt_turns: list[tuple[str, str]], question: str, answer: str) -> str:
    text = "".join(f"\n\nHuman: {h}\n\nAssistant: {a}" for h, a in prompt_turns)
    return f"{text}\n\nHuman: {question}\n\nAssistant: {answer}"


HH_ROWS = [
    {"chosen": _hh([], "How do I bake bread?", "Mix flour, water and yeast."),
     "rejected": _hh([], "How do I bake bread?", "Buy it.")},
    # Multi-turn: the earlier assistant turn belongs to the prompt; only the last answer differs.
    {"chosen": _hh([("Hi", "Hello! How can I help?")], "Name a fruit.", "An apple."),
     "rejected": _hh([("Hi", "Hello! How can I help?")], "Name a fruit.", "A car.")},
    # The two transcripts do not share the prompt (HH-RLHF holds a few): dropped and counted.
    {"chosen": _hh([], "Tell me a joke.", "Why did the chicken cross the road?"),
     "rejected": _hh([], "Tell me a story.", "Once upon a time.")},
]


def _write_gz(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))


@pytest.fixture
def hh_repo(tmp_path):
    """HH-RLHF's repository layout: one folder per subset with train/test .jsonl.gz, and red-team-attempts,
    whose file has another schema and is not a train/test split."""
    root = tmp_path / "hh-rlhf"
    for subset in ("harmless-base", "helpful-base"):
        _write_gz(root / subset / "train.jsonl.gz", HH_ROWS)
        _write_gz(root / subset / "test.jsonl.gz", HH_ROWS[:2])
    _write_gz(root / "red-team-attempts" / "red_team_attempts.jsonl.gz", [{"transcript": "x", "rating": 1}])
    return root


def test_hh_rlhf_as_shipped_keeps_the_multi_turn_prompt_and_drops_mismatched_pairs(hh_repo):
    src = SourceConfig(name="Anthropic/hh-rlhf", path=str(hh_repo / "harmless-base" / "train.jsonl.gz"))
    rows = canonical_rows(src)
    assert rows == [
        {"prompt": "\n\nHuman: How do I bake bread?\n\nAssistant:", "chosen": " Mix flour, water and yeast.",
         "rejected": " Buy it.", "source": "Anthropic/hh-rlhf"},
        {"prompt": "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit.\n\nAssistant:",
         "chosen": " An apple.", "rejected": " A car.", "source": "Anthropic/hh-rlhf"},
    ]
    # The prompt keeps its turns for the chat template too.
    assert to_messages(rows[1]["prompt"]) == [{"role": "user", "content": "Hi"},
                                              {"role": "assistant", "content": "Hello! How can I help?"},
                                              {"role": "user", "content": "Name a fruit."}]


def test_hh_rlhf_repository_root_reads_every_subset_and_subset_picks_one(hh_repo):
    src = SourceConfig(name="Anthropic/hh-rlhf", path=str(hh_repo))
    names = [f.split("hh-rlhf/")[1] for f in source_files(src)]
    assert names == ["harmless-base/train.jsonl.gz", "helpful-base/train.jsonl.gz",
                     "harmless-base/test.jsonl.gz", "helpful-base/test.jsonl.gz"]
    one = SourceConfig(name="Anthropic/hh-rlhf", path=str(hh_repo), subset="helpful-base")
    assert [f.split("hh-rlhf/")[1] for f in source_files(one)] == ["helpful-base/train.jsonl.gz",
                                                                  "helpful-base/test.jsonl.gz"]


def test_hh_rlhf_through_the_data_stage_counts_what_it_dropped(hh_repo, tmp_path):
    from rlhf_core.config.views import DataSettings
    from rlhf_core.data.prepare import build_data

    cfg = tiny_config(tmp_path / "store", **{"data.sources": [{"name": "Anthropic/hh-rlhf", "path": str(hh_repo)}],
                                             "data.split": "1,1,1", "data.max_prompt_tokens": 60,
                                             "rl.generation.max_answer_len": 4})
    built = build_data(DataSettings.from_config(cfg))
    stats = built.metrics["sources"]["0:Anthropic/hh-rlhf"]
    assert stats["invalid_dropped"] == {"rows": {"prompts_differ": 2}}  # one per train file, whatever on_invalid
    assert stats["rows_read"] == {"train": 6, "eval": 4} and stats["rows"] == {"train": 4, "eval": 4}
    assert stats["files"]["train"] == ["harmless-base/train.jsonl.gz", "helpful-base/train.jsonl.gz"]


def test_the_data_key_follows_every_subset_file(hh_repo, tmp_path):
    cfg = tiny_config(tmp_path, **{"data.sources": [{"name": "Anthropic/hh-rlhf", "path": str(hh_repo)}]})
    before = registry.key(registry.DATA, cfg)
    _write_gz(hh_repo / "helpful-base" / "train.jsonl.gz", HH_ROWS[:2])  # the second subset's train file only
    assert registry.key(registry.DATA, cfg) != before


def test_a_column_map_that_makes_transcripts_into_prompts_is_refused(hh_repo):
    path = hh_repo / "harmless-base" / "train.jsonl.gz"
    src = SourceConfig(name="files", path=str(path), columns={"prompt": "chosen", "chosen": "rejected"})
    with pytest.raises(DataError, match=r"row 1 \(line 1\): the prompt has Human:/Assistant: turns but does not end "
                                        r"with the 'Assistant:' cue: it looks like a whole transcript"):
        canonical_rows(src)
    with pytest.raises(ConfigError, match=r"columns maps chosen and prompt to the same column 'chosen'"):
        tiny_config("/tmp/unused", **{"data.sources.0.columns": {"prompt": "chosen", "chosen": "chosen"}})


def test_hh_transcripts_as_files_without_a_map_are_split_the_same_way(hh_repo):
    path = str(hh_repo / "harmless-base" / "train.jsonl.gz")
    as_files = canonical_rows(SourceConfig(name="files", path=path))
    as_hh = canonical_rows(SourceConfig(name="Anthropic/hh-rlhf", path=path))
    assert [{**r, "source": None} for r in as_files] == [{**r, "source": None} for r in as_hh]


def _jsonl(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_trl_conversational_preference_with_an_explicit_prompt(tmp_path):
    row = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sky colour?"}],
           "chosen": [{"role": "assistant", "content": "Blue."}],
           "rejected": [{"role": "assistant", "content": "Green."}]}
    (got,) = canonical_rows(SourceConfig(name="files", path=_jsonl(tmp_path, "p.jsonl", [row])))
    assert got == {"prompt": "Be brief. Human: Sky colour? Assistant:", "chosen": " Blue.", "rejected": " Green.",
                   "source": "files"}
    assert to_messages(got["prompt"]) == row["prompt"]  # the chat template sees the same messages
    assert render_prompt(got["prompt"], "chat_template", TOK).strip().endswith("Assistant:")


def test_trl_implicit_prompt_conversations(tmp_path):
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": "2+2?"}]
    row = {"chosen": turns + [{"role": "assistant", "content": "4"}],
           "rejected": turns + [{"role": "assistant", "content": "5"}]}
    other = {"chosen": turns + [{"role": "assistant", "content": "4"}],
             "rejected": [{"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]}
    src = SourceConfig(name="files", path=_jsonl(tmp_path, "i.jsonl", [row, other]))
    assert canonical_rows(src) == [{"prompt": " Human: Hi Assistant: Hello. Human: 2+2? Assistant:", "chosen": " 4",
                                    "rejected": " 5", "source": "files"}]  # the second shares no prompt: dropped


def test_openai_messages_and_prompt_completion_for_sft(tmp_path):
    msgs = {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]}
    assert canonical_rows(SourceConfig(name="files", path=_jsonl(tmp_path, "m.jsonl", [msgs]))) == [
        {"prompt": " Human: Say hi. Assistant:", "chosen": " Hi!", "rejected": None, "source": "files"}]
    pc = {"prompt": "Say hi.", "completion": "Hi!"}
    assert canonical_rows(SourceConfig(name="files", path=_jsonl(tmp_path, "c.jsonl", [pc])))[0]["chosen"] == " Hi!"
    bad = {"messages": [{"role": "user", "content": "Say hi."}]}
    with pytest.raises(DataError, match=r"row 1 \(line 1\): messages ends with a user message; the last message must "
                                        r"be the assistant's answer"):
        canonical_rows(SourceConfig(name="files", path=_jsonl(tmp_path, "b.jsonl", [bad])))


def test_plain_text_preference_columns_need_no_map(tmp_path):
    row = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}
    assert canonical_rows(SourceConfig(name="files", path=_jsonl(tmp_path, "t.jsonl", [row]))) == [
        {"prompt": " Human: What is 2+2? Assistant:", "chosen": " 4", "rejected": " 5", "source": "files"}]


def test_prompt_only_rows_feed_rl_and_must_say_so(tmp_path):
    path = _jsonl(tmp_path, "prompts.jsonl", [{"prompt": [{"role": "user", "content": f"q{i}"}]} for i in range(3)])
    with pytest.raises(DataError, match=r"holds prompts only \(TRL's prompt-only format: no chosen answer\), so it can "
                                        r"feed rl only; set stages: \[rl\]"):
        canonical_rows(SourceConfig(name="files", path=path))
    rows = canonical_rows(SourceConfig(name="files", path=path, stages=["rl"]))
    assert [r["prompt"] for r in rows] == [" Human: q0 Assistant:", " Human: q1 Assistant:", " Human: q2 Assistant:"]
    assert all(r["chosen"] is None for r in rows)


def test_unknown_columns_list_the_formats(tmp_path):
    path = _jsonl(tmp_path, "u.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"its columns \['answer', 'question'\] are none of the formats read without a "
                                        r"mapping \(messages: messages; preference: prompt, chosen; .*columns:"):
        canonical_rows(SourceConfig(name="files", path=path))


def test_a_missing_column_in_one_row_is_named_as_such(tmp_path):
    rows = [{"prompt": "Human: q Assistant:", "chosen": "a", "rejected": "b"}] * 3 + [
        {"prompt": "Human: q Assistant:", "rejected": "b"}]
    d = tmp_path / "src"
    (d / "data").mkdir(parents=True)
    (d / "data" / "train.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"row 4 \(line 4\): column 'chosen' is missing from this row \(the file's "
                                        r"other rows have it\)"):
        canonical_rows(SourceConfig(name="local/jsonfile", path=str(d)))
    rows[3] = {"prompt": "Human: q Assistant:", "chosen": None, "rejected": "b"}
    (d / "data" / "train.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"row 4 \(line 4\): column 'chosen' is null"):
        canonical_rows(SourceConfig(name="local/jsonfile", path=str(d)))


def test_a_folder_given_as_a_file_is_refused_before_any_work(tmp_path):
    (tmp_path / "pairs").mkdir()
    cfg = tiny_config(tmp_path / "store", **{"data.sources": [{"name": "files", "path": str(tmp_path / "pairs")}]})
    with pytest.raises(DataError, match=r"data.sources.0: source files: path .*pairs is a folder; a files source reads "
                                        r"one file here: give the file"):
        check_sources(cfg.data, {"sft"})
