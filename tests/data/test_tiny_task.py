"""The bundled task: its contrast pairs differ in one respect and the gold reward ranks them; the reward model
the tiny profile trains on them learns repetition (it was at chance before the contrasts existed)."""

import json
import random

import pytest

from rlhf_core.data import tiny_task
from tests.conftest import PROJECT

PROMPT = "Human: describe the cat . Assistant:"


def test_contrasts_by_hand():
    rng = random.Random(0)
    a = "the cat is calm and kind . it looks warm ."
    assert tiny_task.contrast(rng, "all_first", PROMPT, a) == "the cat is calm and calm . it looks calm ."
    dup = tiny_task.contrast(rng, "duplicate", PROMPT, a)
    assert dup.startswith(a + " ") and dup[len(a) + 1:] in ("the cat is calm and kind .", "it looks warm .")
    echo = tiny_task.contrast(rng, "echo", PROMPT, a).split()
    assert len(set(echo) & set(tiny_task.POSITIVE)) == 2 and len(echo) == len(a.split())
    assert "cat" not in tiny_task.contrast(rng, "topic", PROMPT, a).split()
    assert tiny_task.contrast(rng, "echo", PROMPT, "the cat is kind .") is None  # one adjective: nothing to echo
    # gold: 1 + 0.5 * 3 = 2.5; all first: 1 + 0.5 - 2 * 0.25 = 1.0; a sentence again: -0.25 per repeated adjective
    assert [tiny_task.gold_reward(PROMPT, x) for x in (a, "the cat is calm and calm . it looks calm .")] == [2.5, 1.0]


def test_contrast_pairs_prefer_what_the_gold_reward_prefers():
    rng = random.Random(1)
    for kind in tiny_task.CONTRASTS:
        for row in tiny_task.contrast_pairs(rng, kind, 50):
            assert tiny_task.gold_reward(row["prompt"], row["chosen"]) > tiny_task.gold_reward(row["prompt"], row["rejected"])


def test_the_bundled_data_holds_every_contrast_kind():
    rows = [json.loads(line) for line in (PROJECT / "data" / "tiny_task" / "data" / "train.json").read_text().splitlines()]
    repeated = [r for r in rows if r["rejected"].startswith(r["chosen"] + " ")]  # a sentence said again
    assert len(repeated) > 0.05 * len(rows)
    for r in rows:
        assert tiny_task.gold_reward(r["prompt"], r["chosen"]) > tiny_task.gold_reward(r["prompt"], r["rejected"])


@pytest.mark.slow
def test_the_tiny_reward_model_learns_repetition(tiny_trained):
    from benchmarks.tiny_algorithms import reward_model_contrasts
    from rlhf_core.models.reward_model import build_reward_model, load_reward_model
    from rlhf_core.models.tokenizers import load_saved_tokenizer
    from rlhf_core.storage.store import Store

    path = Store.from_config(tiny_trained["cfg"].storage).fetch("reward", tiny_trained["reward"].key, "model")
    rm, tok = load_reward_model(path).eval(), load_saved_tokenizer(path, padding_side="right")
    acc = reward_model_contrasts(rm, tok, n=200)
    print(acc)  # measured: topic 0.96, all_first 0.91, duplicate 0.98, echo 0.85, independent 0.95
    assert acc["all_first"] >= 0.8 and acc["duplicate"] >= 0.9 and acc["echo"] >= 0.75, acc
    assert acc["topic"] >= 0.85 and acc["independent"] >= 0.85, acc
    # what PPO learnt to say before: repeating adjectives no longer beats a good answer
    rows = [{"prompt": PROMPT, "chosen": "the cat is calm and kind . it looks warm .",
             "rejected": "the cat is kind and kind . the cat is kind and kind ."}]
    from benchmarks.tiny_algorithms import score_rows

    chosen, rejected = score_rows(rm, tok, rows)
    assert chosen.item() > rejected.item()
    # negative control: the same model untrained is at chance, so the accuracy above is learnt
    untrained = build_reward_model(tiny_trained["cfg"].models.reward, tok).eval()
    assert reward_model_contrasts(untrained, tok, n=200)["all_first"] < 0.7
