"""Rule-based rewards: loading "package.module:function", checking what it returns, and keying by the module
file's content (an edited rule gives a new step-3 key, a moved or renamed one that reads the same does not)."""

import sys

import pytest

from rlhf_core.models.reward_function import RewardFunction, RewardFunctionError
from rlhf_core.stages import registry
from rlhf_core.storage.fingerprint import MissingReference, function_fingerprint
from rlhf_core.storage.store import Manifest
from tests.conftest import tiny_config

RULE = "def score(prompt, answer):\n    return float(len(answer.split()))\n"


@pytest.fixture
def rule_module(tmp_path, monkeypatch):
    """An importable module ``my_rules`` (a user's file on PYTHONPATH)."""
    (tmp_path / "my_rules.py").write_text(RULE + "def bad(prompt, answer):\n    return float('nan')\n"
                                          "def text(prompt, answer):\n    return 'good'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_rules", raising=False)  # each test's own file, not an earlier test's
    return tmp_path / "my_rules.py"


def test_the_bundled_gold_reward_is_a_reward_function():
    from rlhf_core.data.tiny_task import gold_reward

    fn = RewardFunction("rlhf_core.data.tiny_task:gold_reward", "eval.gold_reward")
    prompts = ["Human: describe the cat . Assistant:"] * 2
    answers = ["the cat is calm and kind .", "the cat is kind and kind . the cat is kind and kind ."]
    assert fn(prompts, answers) == [gold_reward(p, a) for p, a in zip(prompts, answers)] == [2.0, 0.75]


def test_a_user_rule_loads_and_its_values_are_checked(rule_module):
    assert RewardFunction("my_rules:score", "reward.function")(["p"], ["a b c"]) == [3.0]
    with pytest.raises(RewardFunctionError, match=r"reward.function my_rules:bad returned nan for answer 0"):
        RewardFunction("my_rules:bad", "reward.function")(["p"], ["a"])
    with pytest.raises(RewardFunctionError, match="returned 'good'.*must return a finite float"):
        RewardFunction("my_rules:text", "reward.function")(["p"], ["a"])
    with pytest.raises(RewardFunctionError, match="module 'my_rules' has no function 'nope'"):
        RewardFunction("my_rules:nope", "reward.function")
    with pytest.raises(RewardFunctionError, match="cannot import 'no_such_rules'.*PYTHONPATH"):
        RewardFunction("no_such_rules:score", "reward.function")


def test_the_key_holds_the_module_files_content(rule_module, tmp_path):
    cfg = tiny_config(tmp_path / "store", **{"reward.function": "my_rules:score"})
    up = {name: Manifest(stage=name, key="k" * 20, stage_version=1, content_id=f"c-{name}", config={},
                                  files=[], created_at="2026-01-01T00:00:00") for name in registry.ORDER}
    before = registry.key("rl", cfg, up)
    assert registry.key("rl", cfg, up) == before
    assert function_fingerprint("my_rules:score").startswith("my_rules:score@")
    rule_module.write_text(rule_module.read_text().replace("len(answer.split())", "len(answer)"))
    assert registry.key("rl", cfg, up) != before  # the rule changed: step 3 runs again
    assert registry.key("sft", cfg, up) == registry.key("sft", tiny_config(tmp_path / "store"), up)  # SFT does not read it
    with pytest.raises(MissingReference, match="cannot find module 'gone_rules'.*importable"):
        function_fingerprint("gone_rules:score")
