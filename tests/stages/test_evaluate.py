"""The evaluation's table: win rates judged by the reward model and by the gold reward, side by side."""

import pytest

from rlhf_core.config import load_config
from rlhf_core.config.views import EvaluateSettings
from rlhf_core.stages.evaluate import ModelSamples, render_report, summarize, win_rate


def _samples(scores, gold):
    n = len(gold)
    return ModelSamples([f"answer {i}" for i in range(n)], scores, gold, [0.5] * n, [4] * n, None)


def test_win_rates_by_hand():
    # 3 wins, 1 tie (half), 1 loss over 5 prompts = 3.5 / 5
    assert win_rate([2, 3, 1, 5, 0], [1, 1, 1, 4, 9]) == pytest.approx(0.7)


def test_both_judges_side_by_side():
    # the reward model prefers the trained actor on every prompt; the gold reward on one of four (one tie)
    table = summarize({"sft": _samples([0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 1.0, 2.0]),
                       "final": _samples([9.0, 9.0, 9.0, 9.0], [0.5, 2.0, 2.0, 1.0])})
    assert table["sft"]["win_rate_vs_sft"] == 0.5 and table["sft"]["gold_win_rate_vs_sft"] == 0.5
    assert table["final"]["win_rate_vs_sft"] == 1.0
    assert table["final"]["gold_win_rate_vs_sft"] == pytest.approx((0 + 0.5 + 1 + 0) / 4)
    assert table["final"]["gold_reward"] == pytest.approx(5.5 / 4)
    settings = EvaluateSettings.from_config(load_config("tiny"))
    rows = [{"prompt": "p", "sft_answer": "a", "final_answer": "b", "sft_score": 0.0, "final_score": 9.0,
             "sft_gold": 1.0, "final_gold": 0.5}]
    report = render_report(settings, table, rows, {})
    assert "`gold_win_rate_vs_sft` use the gold reward `rlhf_core.data.tiny_task:gold_reward`" in report
    assert "| final | 9.000 | 1.000 | 1.375 | 0.375 |" in report
    assert "b (9.00, gold 0.50)" in report


def test_without_a_reward_model_the_gold_reward_judges_alone():
    table = summarize({"sft": _samples(None, [1.0, 2.0]), "final": _samples(None, [2.0, 2.0])})
    assert "win_rate_vs_sft" not in table["final"] and table["final"]["gold_win_rate_vs_sft"] == 0.75
