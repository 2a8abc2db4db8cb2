import pytest
import torch

from rlhf_core.config import LoraConfig, ModelSpec
from rlhf_core.maths.algos import last_index
from rlhf_core.models.causal_lm import build_causal_lm, save_causal_lm
from rlhf_core.models.loading import ModelLoadError
from rlhf_core.models.lora import apply_lora, merge_lora
from rlhf_core.models.reward_model import RewardMeta, RewardModel, build_reward_model, load_reward_model, save_reward_model, sequence_scores
from rlhf_core.models.tokenizers import load_tokenizer
from tests.conftest import PROJECT

TOK = str(PROJECT / "data" / "tiny_tokenizer")
OPT = ModelSpec(architecture={"model_type": "opt", "hidden_size": 32, "num_hidden_layers": 1, "ffn_dim": 64,
                              "num_attention_heads": 2, "max_position_embeddings": 64, "word_embed_proj_dim": 32},
                tokenizer=TOK, init_seed=3)
LLAMA = ModelSpec(architecture={"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1,
                                "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 2,
                                "max_position_embeddings": 64}, tokenizer=TOK, init_seed=4)


def test_last_token_index_left_and_right_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]])
    assert last_index(mask).tolist() == [2, 4, 4, 2]
    values = torch.arange(20, dtype=torch.float).reshape(4, 5)
    assert sequence_scores(values, mask).tolist() == [2.0, 9.0, 14.0, 17.0]


@pytest.mark.parametrize("spec", [OPT, LLAMA], ids=["opt", "llama"])
def test_score_is_padding_invariant(spec):
    """The same sequence scores the same alone, right-padded, and left-padded, even when its first token
    has the pad id (OPT's leading BOS/pad quirk)."""
    tok = load_tokenizer(spec)
    model = build_reward_model(spec, tok).eval()
    seq = [tok.pad_token_id] + tok(" Human: describe the cat . Assistant: the cat is kind .",
                                   add_special_tokens=False)["input_ids"]
    n, pad = len(seq), tok.pad_token_id
    alone = model.score(torch.tensor([seq]), torch.ones(1, n, dtype=torch.long))
    right = model.score(torch.tensor([seq + [pad] * 3]), torch.tensor([[1] * n + [0] * 3]))
    left = model.score(torch.tensor([[pad] * 3 + seq]), torch.tensor([[0] * 3 + [1] * n]))
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(left, alone, atol=1e-4, rtol=0)
    # A score at the wrong position (the naive "last column") would differ.
    naive = model(torch.tensor([seq + [pad] * 3]), torch.tensor([[1] * n + [0] * 3]))[:, -1]
    assert not torch.allclose(naive, alone, atol=1e-4)


def test_reward_model_round_trip_keeps_head_and_stats(tmp_path):
    tok = load_tokenizer(LLAMA)
    model = build_reward_model(LLAMA, tok).eval()
    save_reward_model(model, tok, str(tmp_path / "rm"), RewardMeta(score_mean=1.5, score_std=2.0, max_seq_len=32,
                                                                  prompt_format="human_assistant", eval_accuracy=0.5))
    loaded = load_reward_model(str(tmp_path / "rm")).eval()
    ids = torch.tensor([[1, 7, 8, 9]])
    mask = torch.ones_like(ids)
    torch.testing.assert_close(loaded.score(ids, mask), model.score(ids, mask))
    assert loaded.score_mean.item() == 1.5 and loaded.score_std.item() == 2.0


def test_init_seed_decides_the_weights_and_does_not_touch_global_rng():
    tok = load_tokenizer(OPT)
    torch.manual_seed(0)
    before = torch.rand(1)
    a = build_causal_lm(OPT, tok)
    torch.manual_seed(0)
    b = build_causal_lm(OPT, tok)
    assert torch.rand(1) == before  # the global stream was not consumed
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = build_causal_lm(OPT.model_copy(update={"init_seed": 9}), tok)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_lora_trains_only_adapters_and_merges_to_a_plain_model(tmp_path):
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(OPT)
    base = build_causal_lm(OPT, tok)
    model = apply_lora(base, LoraConfig(enabled=True, r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # pretend training moved the adapters
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    ids = torch.tensor([[1, 7, 8, 9, 10]])
    expected = model.eval()(ids).logits  # eval: no dropout in either
    save_causal_lm(model, tok, str(tmp_path / "merged"))
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert not any("lora" in k for k in plain.state_dict())
    torch.testing.assert_close(plain(ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_lora_all_parameters_option():
    tok = load_tokenizer(OPT)
    model = apply_lora(build_causal_lm(OPT, tok), LoraConfig(enabled=True, only_optimize_lora=False))
    assert all(p.requires_grad for p in model.parameters())


def test_lora_on_reward_model_keeps_head_trainable():
    tok = load_tokenizer(LLAMA)
    rm = apply_lora(build_reward_model(LLAMA, tok), LoraConfig(enabled=True))
    assert isinstance(rm, RewardModel) and rm.v_head.weight.requires_grad
    assert not merge_lora(rm).backbone.__class__.__name__.startswith("Peft")


def test_dropout_override_reaches_the_config():
    tok = load_tokenizer(OPT)
    model = build_causal_lm(OPT, tok, dropout=0.0)
    assert model.config.dropout == 0.0 and model.config.attention_dropout == 0.0


def test_tokenizer_without_pad_token_is_refused(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOK)
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "nopad")
    spec = ModelSpec(architecture={"model_type": "opt"}, tokenizer=str(tmp_path / "nopad"))
    with pytest.raises(ModelLoadError, match=r"has no pad token; set models.actor.pad_token"):
        load_tokenizer(spec)
    assert load_tokenizer(spec.model_copy(update={"pad_token": "eos"})).pad_token == "</s>"


def test_unloadable_model_names_role_and_reference(tmp_path):
    spec = ModelSpec(name_or_path=str(tmp_path / "missing"), tokenizer=TOK)
    with pytest.raises(ModelLoadError, match=r"models.actor: cannot load .*missing"):
        build_causal_lm(spec, load_tokenizer(OPT))
    with pytest.raises(ModelLoadError, match="is not a reward model"):
        load_reward_model(str(tmp_path))
