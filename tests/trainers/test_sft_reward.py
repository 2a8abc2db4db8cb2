"""Steps 1 and 2 on DeepSpeed (CPU): quality on the bundled task, exports, LoRA."""

import json

import pytest
import torch

from rlhf_core.models.reward_model import load_reward_model
from rlhf_core.storage.store import Store
from tests.conftest import tiny_config
from tests.helpers import output, prepare, weights, worker

pytestmark = pytest.mark.slow


def test_sft_lowers_held_out_loss_and_exports_a_plain_hf_model(tiny_trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = tiny_trained["sft"]
    assert m.metrics["eval_loss"] < 0.5 * m.metrics["eval_loss_before"], m.metrics
    assert m.metrics["eval_perplexity"] < 4.0
    store = Store.from_config(tiny_trained["cfg"].storage)
    path = store.fetch("sft", m.key, "model")
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    out = model.generate(**tok(" Human: describe the cat . Assistant:", return_tensors="pt"), max_new_tokens=8,
                         do_sample=False)
    answer = tok.decode(out[0], skip_special_tokens=True).split("Assistant:")[-1].split()
    assert answer[:2] == ["the", "cat"], answer  # it learned the task's grammar and the topic
    files = {f.path for f in m.files}
    assert {"model/model.safetensors", "model/config.json", "logs/metrics.jsonl", "logs/curves.png"} <= files
    assert not any(p.endswith((".pt", ".bin", ".pkl")) for p in files)


def test_reward_model_separates_held_out_pairs(tiny_trained):
    m = tiny_trained["reward"]
    assert m.metrics["eval_accuracy"] >= 0.9, m.metrics
    assert m.metrics["eval_accuracy_before"] < 0.7  # it was learned, not built in
    assert m.metrics["eval_chosen_score"] > m.metrics["eval_rejected_score"]
    store = Store.from_config(tiny_trained["cfg"].storage)
    rm = load_reward_model(store.fetch("reward", m.key, "model"))
    assert rm.score_mean.item() == pytest.approx(m.metrics["score_mean"])
    assert rm.score_std.item() == pytest.approx(m.metrics["score_std"]) and m.metrics["score_std"] > 0


def test_training_curves_are_logged(tiny_trained):
    store = Store.from_config(tiny_trained["cfg"].storage)
    rows = [json.loads(line) for line in store.read_bytes("sft", tiny_trained["sft"].key, "logs/metrics.jsonl").splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == sorted(steps) and len(steps) == tiny_trained["sft"].metrics["steps"]
    assert any(p.startswith("logs/tensorboard/events.out.tfevents") for p in (f.path for f in tiny_trained["sft"].files))


def test_cards_carry_hugging_face_metadata_and_live_metrics_leave_nothing_behind(tiny_trained):
    from rlhf_core.models.card import card_metadata
    from tests.conftest import PROJECT

    store = Store.from_config(tiny_trained["cfg"].storage)
    for stage, tag, kind, metric in (("sft", "sft", "loss", "eval_loss"),
                                     ("reward", "reward-model", "accuracy", "eval_accuracy")):
        m = tiny_trained[stage]
        head = card_metadata(store.read_bytes(stage, m.key, "model/README.md").decode())
        assert head["library_name"] == "transformers" and head["tags"] == ["rlhf-flow", tag]
        assert "base_model" not in head and "datasets" not in head  # built from config, from the bundled files
        (result,) = head["model-index"][0]["results"]
        assert {x["type"]: x["value"] for x in result["metrics"]}[kind] == pytest.approx(m.metrics[metric])
        # The live TensorBoard/JSONL folder lived in the output folder while it trained; the commit cleared it,
        # and the working directory (the workers' is the project) got no ./runs of it.
        assert not store.fs.exists(store.output_path(stage, m.key, "live"))
        assert not list(PROJECT.glob(f"runs/{stage}-{m.key[:12]}"))


def test_lora_sft_trains_and_exports_a_merged_model(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(tmp_path, **{"sft.lora.enabled": True, "sft.lora.r": 16, "sft.lora.alpha": 16,
                                   "sft.lora.target_modules": ["q_proj", "v_proj", "fc1", "fc2"],
                                   "sft.lora.only_optimize_lora": True, "sft.max_steps": 60,
                                   "sft.optimizer.lr": 2e-2})
    data = prepare(cfg)
    proc = worker(cfg, "sft", {"data": data})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    m = output(cfg, "sft", {"data": data})
    # Adapters over a frozen random-init base learn slowly; a pretrained base is LoRA's real use.
    assert m.metrics["eval_loss"] < m.metrics["eval_loss_before"] - 0.3, m.metrics
    w = weights(cfg, m)
    assert not any("lora" in k for k in w)
    model = AutoModelForCausalLM.from_pretrained(Store.from_config(cfg.storage).fetch("sft", m.key, "model"))
    # Only LoRA was trained, so merged q_proj moved while the untouched k_proj equals the random init.
    from rlhf_core.models.causal_lm import build_causal_lm
    from rlhf_core.models.tokenizers import load_tokenizer

    init = build_causal_lm(cfg.models.actor, load_tokenizer(cfg.models.actor))
    layer, init_layer = model.model.decoder.layers[0].self_attn, init.model.decoder.layers[0].self_attn
    assert torch.equal(layer.k_proj.weight, init_layer.k_proj.weight)
    assert not torch.equal(layer.q_proj.weight, init_layer.q_proj.weight)
