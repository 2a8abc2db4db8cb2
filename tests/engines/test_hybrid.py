"""The hybrid engine's fast generation path on CPU: the same tokens as transformers generate (greedy),
correct sampling distributions, EOS handling, LoRA merging, release, chunking, the family registry and
fallback."""

import dataclasses
from dataclasses import fields

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from rlhf_core.config import GenerationConfig, HybridEngineConfig
from rlhf_core.engines.decode import FAMILIES, FastDecoder, arch_of
from rlhf_core.engines.hybrid import HybridEngine, left_pad

SHAPES = {
    "opt": dict(model_type="opt", hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                max_position_embeddings=128, word_embed_proj_dim=64),
    # OPT-350M's layout: LayerNorm after the sublayers, embeddings projected in and out
    "opt_post_ln_projected": dict(model_type="opt", hidden_size=64, num_hidden_layers=2, ffn_dim=128,
                                  num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=32,
                                  do_layer_norm_before=False),
    "llama_gqa": dict(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
}


class Tok:
    pad_token_id, eos_token_id = 0, 2


def _config(shape: str, **changes):
    kw = {**SHAPES[shape], **changes}
    return AutoConfig.for_model(kw.pop("model_type"), **kw, vocab_size=96, pad_token_id=0, eos_token_id=2,
                                bos_token_id=1)


def _model(shape: str, seed: int = 0):
    config = _config(shape)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # sharpen a random model so that greedy choices are not near-ties
        for p in model.parameters():
            p.mul_(4.0)
    return model


def _prompts(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return left_pad([[1] + torch.randint(3, 96, (n,), generator=g).tolist() for n in (5, 9, 3, 12)], 0)


def _hf(model, ids, mask, n=20):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0,
                         eos_token_id=2)[:, ids.shape[1]:]
    return torch.cat([out, out.new_zeros(out.shape[0], n - out.shape[1])], 1)  # pad to n like ours


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_greedy_tokens_equal_transformers_generate(shape):
    model = _model(shape)
    ids, mask = _prompts()
    fd = FastDecoder(arch_of(model.config), torch.device("cpu"), torch.float32, 0, 2, do_sample=False)
    fd.load(model)
    assert torch.equal(fd.generate(ids, mask, 20), _hf(model, ids, mask))


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_both_attention_kernels_agree(attention):
    model = _model("llama_gqa")
    ids, mask = _prompts()
    fd = FastDecoder(arch_of(model.config), torch.device("cpu"), torch.float32, 0, 2, do_sample=False, attention=attention)
    fd.load(model)
    assert torch.equal(fd.generate(ids, mask, 20), _hf(model, ids, mask))


def test_lora_is_merged_for_generation():
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(_model("opt"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"]))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    peft.eval()
    ids, mask = _prompts()
    gen = GenerationConfig(max_answer_len=20, do_sample=False)
    fast = HybridEngine(peft, Tok(), gen, HybridEngineConfig(enabled=True))
    slow = HybridEngine(peft, Tok(), gen, HybridEngineConfig(enabled=False))
    assert fast.path == "fast" and slow.path == "transformers"
    a, b = fast.generate(ids, mask), slow.generate(ids, mask)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.response_mask, b.response_mask)
    # Negative control: without the adapters the answers differ, so the merge is what made them equal.
    with peft.disable_adapter():
        plain = HybridEngine(peft, Tok(), gen, HybridEngineConfig(enabled=False)).generate(ids, mask)
    assert not torch.equal(plain.sequences, a.sequences)


def test_answers_stop_at_eos_and_pad_after():
    model = _model("opt")
    with torch.no_grad():
        model.lm_head.weight[2] += 3.0 * model.lm_head.weight.abs().max()  # make EOS likely
    ids, mask = _prompts()
    rollout = HybridEngine(model, Tok(), GenerationConfig(max_answer_len=20, do_sample=False),
                           HybridEngineConfig(enabled=True)).generate(ids, mask)
    for row, m in zip(rollout.responses, rollout.response_mask):
        n = int(m.sum())
        assert row[n - 1] == 2 or n == 20  # the mask ends with the EOS (or at the limit)
        assert (row[n:] == 0).all()  # pad after it
    assert rollout.sequences.shape == (4, ids.shape[1] + 20)


def _sampler(**kw) -> FastDecoder:
    arch = arch_of(_model("opt").config)
    return FastDecoder(arch, torch.device("cpu"), torch.float32, 0, 2, do_sample=True, **kw)


@pytest.mark.parametrize("kw, allowed", [
    ({"temperature": 1.0}, [0, 1, 2, 3]),
    ({"temperature": 0.5}, [0, 1, 2, 3]),
    ({"top_k": 2}, [0, 1]),
    ({"top_p": 0.7}, [0, 1]),  # p = .53, .26, .13, .07: the smallest prefix with mass >= .7 is {0, 1}
])
def test_sampling_draws_from_the_configured_distribution(kw, allowed):
    logits = torch.tensor([[2.0, 1.3, 0.6, 0.0]]).repeat(40000, 1)
    torch.manual_seed(0)
    draws, logprobs = _sampler(**kw)._sample(logits)
    # The log-prob of each draw is under softmax(logits / temperature), whatever top-k / top-p truncated.
    full = (logits[0] / kw.get("temperature", 1.0)).log_softmax(0)
    torch.testing.assert_close(logprobs, full[draws])
    target = torch.full((4,), float("-inf"))
    target[allowed] = logits[0, allowed] / kw.get("temperature", 1.0)
    expected = target.softmax(0)
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert torch.allclose(freq, expected, atol=0.01), (freq, expected)


def test_greedy_sampler_is_argmax():
    fd = FastDecoder(arch_of(_model("opt").config), torch.device("cpu"), torch.float32, 0, 2, do_sample=False)
    token, logprob = fd._sample(torch.tensor([[0.1, 3.0, 0.2]]))
    assert token.tolist() == [1]
    torch.testing.assert_close(logprob, torch.tensor([0.1, 3.0, 0.2]).log_softmax(0)[1:2])


def test_release_frees_and_the_next_rollout_reloads():
    model = _model("opt")
    ids, mask = _prompts()
    fd = FastDecoder(arch_of(model.config), torch.device("cpu"), torch.float32, 0, 2, do_sample=False)
    fd.load(model)
    first = fd.generate(ids, mask, 10)
    held = fd.buffers
    assert held.weights.t and held.k is not None  # the control: before release it holds them
    fd.release()
    assert fd.buffers is None
    assert not [v for v in (*vars(fd).values(), *vars(fd.family).values()) if isinstance(v, torch.Tensor)]
    assert all(getattr(held, f.name) is None for f in fields(held))  # also for anyone still holding the buffers
    with pytest.raises(RuntimeError, match="load"):
        fd.generate(ids, mask, 10)
    fd.load(model)
    assert torch.equal(fd.generate(ids, mask, 10), first)


def test_weights_are_refreshed_in_place_between_rollouts():
    """Training changes the weights; the next rollout must see them (buffers are reused, not stale)."""
    model = _model("opt")
    ids, mask = _prompts()
    fd = FastDecoder(arch_of(model.config), torch.device("cpu"), torch.float32, 0, 2, do_sample=False)
    fd.load(model)
    buffer = fd.buffers.weights["0.fc1.w"]
    before = fd.generate(ids, mask, 10)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    fd.load(model)
    assert fd.buffers.weights["0.fc1.w"] is buffer  # same storage (what a captured graph reads)
    assert torch.equal(fd.generate(ids, mask, 10), _hf(model, ids, mask, 10))
    assert not torch.equal(fd.generate(ids, mask, 10), before)


def test_family_registry_reads_every_family_and_refuses_the_rest():
    for shape in SHAPES:  # every family's arch_of reads the test shapes back
        config = _config(shape)
        arch = arch_of(config)
        assert arch.family is FAMILIES[config.model_type]
        assert (arch.layers, arch.hidden, arch.heads, arch.vocab, arch.max_positions) == (
            config.num_hidden_layers, config.hidden_size, config.num_attention_heads, 96, 128)
        assert arch.kv_heads == getattr(config, "num_key_value_heads", config.num_attention_heads)
        assert arch.head_dim * arch.heads == config.hidden_size
        assert arch.pre_ln == getattr(config, "do_layer_norm_before", True)
    assert set(FAMILIES) == {SHAPES[s]["model_type"] for s in SHAPES}  # no registered family goes untested
    assert arch_of(AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2)) is None  # no such family
    assert arch_of(object()) is None  # no model_type at all
    # variants a family does not implement
    assert arch_of(_config("opt", activation_function="silu")) is None
    assert arch_of(_config("llama_gqa", rope_scaling={"rope_type": "linear", "factor": 2.0})) is None


def test_a_batch_above_max_batch_is_generated_in_chunks_on_the_fast_path(monkeypatch):
    model = _model("opt")
    ids, mask = _prompts()
    gen = GenerationConfig(max_answer_len=20, do_sample=False)
    whole = HybridEngine(model, Tok(), gen, HybridEngineConfig(max_batch=4))
    chunked = HybridEngine(model, Tok(), gen, HybridEngineConfig(max_batch=3))
    rows = []
    decode = chunked.fast.generate
    monkeypatch.setattr(chunked.fast, "generate", lambda i, m, a, **kw: rows.append(i.shape[0]) or decode(i, m, a, **kw))
    a, b = whole.generate(ids, mask), chunked.generate(ids, mask)
    assert whole.last_path == chunked.last_path == "fast" and rows == [3, 1]
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.response_mask, b.response_mask)
    assert torch.equal(b.responses, _hf(model, ids, mask))


def test_unsupported_architectures_fall_back_to_transformers():
    config = AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2, vocab_size=96, n_positions=64)
    model = AutoModelForCausalLM.from_config(config).eval()
    engine = HybridEngine(model, Tok(), GenerationConfig(max_answer_len=5, do_sample=False), HybridEngineConfig())
    assert engine.path == "transformers"
    ids, mask = _prompts()
    assert engine.generate(ids, mask).responses.shape == (4, 5)


def test_memory_estimate_covers_the_weights_and_cache_the_decoder_allocates():
    model = _model("llama_gqa")
    fd = FastDecoder(arch_of(model.config), torch.device("cpu"), torch.float32, 0, 2, do_sample=False)
    fd.load(model)
    ids, mask = _prompts()
    fd.generate(ids, mask, 20)
    b = fd.buffers
    held = sum(t.numel() * t.element_size() for t in [*b.weights.t.values(), b.k, b.v])
    need = fd.bytes_needed(model, ids.shape[0], ids.shape[1], ids.shape[1] + 20)
    assert held <= need <= 3 * held  # an estimate: all of what it holds, plus room for the prefill


@pytest.mark.parametrize("free_gib", [1e-6, None])
def test_a_rollout_that_does_not_fit_the_device_generates_with_transformers(free_gib, monkeypatch):
    """A ZeRO-3 actor too big for one device must not OOM in the fast path; None (the default, unbounded
    on CPU) is the control that takes the fast path."""
    model = _model("opt")
    if free_gib is not None:
        monkeypatch.setattr(FastDecoder, "bytes_available", lambda self: int(free_gib * 2**30))
    said = []
    engine = HybridEngine(model, Tok(), GenerationConfig(max_answer_len=20, do_sample=False), HybridEngineConfig(),
                          log=said.append)
    ids, mask = _prompts()
    rollout = engine.generate(ids, mask)
    assert torch.equal(rollout.responses, _hf(model, ids, mask))  # the same tokens either way
    if free_gib is None:
        assert engine.path == "fast" and said == []
    else:
        assert engine.path == "transformers"
        assert len(said) == 1 and "whole weights alone do not fit" in said[0] and "GiB" in said[0]
        engine.generate(ids, mask)
        assert len(said) == 1  # said once, not per rollout


def test_prompt_plus_answer_beyond_the_positions_is_refused():
    model = _model("opt")
    fd = FastDecoder(arch_of(model.config), torch.device("cpu"), torch.float32, 0, 2, do_sample=False)
    fd.load(model)
    ids, mask = _prompts()
    with pytest.raises(ValueError, match="exceed the model's 128 positions"):
        fd.generate(ids, mask, 120)


@pytest.mark.slow
def test_trained_tiny_actor_fast_equals_transformers(tiny_trained):
    """On the trained tiny SFT model (real EOS stops, left-padded prompts of several lengths)."""
    from rlhf_core.data.prepare import load_split
    from rlhf_core.trainers.experience import tokenize_prompts
    from rlhf_core.models.causal_lm import load_causal_lm
    from rlhf_core.models.tokenizers import load_saved_tokenizer
    from rlhf_core.storage.store import Store

    store = Store.from_config(tiny_trained["cfg"].storage)
    path = store.fetch("sft", tiny_trained["sft"].key, "model")
    tok, model = load_saved_tokenizer(path, "left"), load_causal_lm(path).eval()
    prompts = list(load_split(store, tiny_trained["data"], "rl/eval")["prompt"])[:48]
    ids, mask = left_pad(tokenize_prompts(prompts, tok, "human_assistant"), tok.pad_token_id)
    gen = GenerationConfig(max_answer_len=24, do_sample=False)
    fast = HybridEngine(model, tok, gen, HybridEngineConfig(enabled=True)).generate(ids, mask)
    slow = HybridEngine(model, tok, gen, HybridEngineConfig(enabled=False)).generate(ids, mask)
    assert torch.equal(fast.sequences, slow.sequences)
    assert fast.response_mask.sum(1).float().mean() < 24  # answers ended at EOS, not at the limit


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_rollout_logprobs_equal_a_forward_of_the_model(shape):
    """The fast path's sampled-token log-probs are the model's own (rl.old_logprobs: rollout), at the sampling
    temperature, 0 after each answer's end; a wrong temperature would not match (negative control)."""
    from rlhf_core.trainers.experience import sequence_logprobs

    model = _model(shape)
    ids, mask = _prompts()
    gen = GenerationConfig(max_answer_len=12, do_sample=True, temperature=0.7)
    engine = HybridEngine(model, Tok(), gen, HybridEngineConfig(enabled=True))
    torch.manual_seed(3)
    rollout = engine.generate(ids, mask)
    assert engine.last_path == "fast" and rollout.logprobs is not None
    want = sequence_logprobs(model, rollout.sequences, rollout.attention_mask, rollout.prompt_len, 0.7)
    torch.testing.assert_close(rollout.logprobs, want * rollout.response_mask, atol=2e-4, rtol=0)
    wrong = sequence_logprobs(model, rollout.sequences, rollout.attention_mask, rollout.prompt_len, 1.0)
    assert (rollout.logprobs - wrong * rollout.response_mask).abs().max() > 1e-2


def test_old_logprobs_from_the_rollout_skip_the_actor_forward():
    """rl.old_logprobs: rollout takes the fast path's log-probs as they are (no actor forward); recompute, and a
    rollout without log-probs (the transformers path), run the forward; both agree to rounding on CPU."""
    from rlhf_core.config import ModelSpec, RLConfig
    from rlhf_core.models.reward_model import RewardMeta, build_reward_model
    from rlhf_core.trainers.experience import Models, make_experience
    from rlhf_core.trainers.metrics import Timer

    model = _model("opt")
    ids, mask = _prompts()
    engine = HybridEngine(model, Tok(), GenerationConfig(max_answer_len=8, do_sample=True), HybridEngineConfig(enabled=True))
    torch.manual_seed(5)
    rollout = engine.generate(ids, mask)
    assert rollout.logprobs is not None

    class SizeTok(Tok):
        bos_token_id = 1

        def __len__(self):
            return 96

    rm = build_reward_model(ModelSpec(architecture=SHAPES["opt"], tokenizer="stub"), SizeTok()).eval()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    meta = RewardMeta(score_mean=0.0, score_std=1.0, max_seq_len=128, prompt_format="human_assistant", eval_accuracy=0.5)
    m = Models(model, rm, model, rm, None, Tok(), Tok(), meta)

    def scorer(prompts, r):
        return torch.zeros(r.sequences.shape[0])

    def old(mode, r):
        calls.clear()
        exp, _ = make_experience(m, scorer, r, [""] * 4, RLConfig(old_logprobs=mode, rollout_batch_size=4,
                                                                  train_micro_batch_size=4), 0.1, Timer(torch.device("cpu")))
        return exp.old_logprobs, len(calls)

    taken, forwards_rollout = old("rollout", rollout)
    assert taken is rollout.logprobs
    recomputed, forwards_recompute = old("recompute", rollout)
    assert forwards_recompute == forwards_rollout + 1  # the actor's forward, and only it, is skipped
    torch.testing.assert_close(recomputed * rollout.response_mask, rollout.logprobs, atol=2e-4, rtol=0)
    fallback, forwards = old("rollout", dataclasses.replace(rollout, logprobs=None))
    assert forwards == forwards_recompute
    torch.testing.assert_close(fallback, recomputed)
