"""Scoring with a reward model whose tokenizer differs from the actor's: text round trip."""

import json

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from rlhf_core.config import ModelSpec
from rlhf_core.trainers.experience import RewardScorer, same_tokenizer
from rlhf_core.engines.hybrid import Rollout, left_pad, response_mask_from
from rlhf_core.models.reward_model import build_reward_model, sequence_scores
from rlhf_core.models.tokenizers import load_tokenizer
from tests.conftest import PROJECT

TINY = str(PROJECT / "data" / "tiny_tokenizer")


def _shuffled_tokenizer(tmp_path) -> str:
    """The tiny tokenizer with its vocabulary ids permuted: the same words, other ids."""
    from tokenizers import Tokenizer

    raw = json.loads((PROJECT / "data" / "tiny_tokenizer" / "tokenizer.json").read_text())
    vocab = raw["model"]["vocab"]
    words = sorted(vocab, key=lambda w: vocab[w])
    specials, rest = words[:4], words[4:][::-1]
    raw["model"]["vocab"] = {w: i for i, w in enumerate(specials + rest)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(raw)), bos_token="<s>",
                                  eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    tok.save_pretrained(tmp_path / "shuffled")
    return str(tmp_path / "shuffled")


def test_different_tokenizers_are_bridged_by_text(tmp_path):
    actor_tok = load_tokenizer(ModelSpec(architecture={"model_type": "opt"}, tokenizer=TINY))
    reward_path = _shuffled_tokenizer(tmp_path)
    reward_tok = AutoTokenizer.from_pretrained(reward_path)
    assert not same_tokenizer(actor_tok, reward_tok)
    spec = ModelSpec(architecture={"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1,
                                   "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 2,
                                   "max_position_embeddings": 64}, tokenizer=reward_path)
    rm = build_reward_model(spec, reward_tok).eval()
    prompts = [" Human: describe the cat . Assistant:", " Human: tell me about the lake . Assistant:"]
    answers = [" the cat is calm .", " the lake is kind and warm . it looks sunny ."]
    ids, mask = left_pad(actor_tok(prompts)["input_ids"], actor_tok.pad_token_id)
    ans = [actor_tok(a, add_special_tokens=False)["input_ids"] + [actor_tok.eos_token_id] for a in answers]
    A = max(map(len, ans))
    resp = torch.tensor([a + [actor_tok.pad_token_id] * (A - len(a)) for a in ans])
    rollout = Rollout(torch.cat([ids, resp], 1), torch.cat([mask, response_mask_from(resp, actor_tok.eos_token_id)], 1),
                      response_mask_from(resp, actor_tok.eos_token_id), ids.shape[1])
    got = RewardScorer(rm, reward_tok, actor_tok, "human_assistant", 64, torch.device("cpu"))(prompts, rollout)
    # What the reward model scores is the same text in its own ids: prompt + answer + its EOS.
    rows = [reward_tok(p)["input_ids"] + reward_tok(a, add_special_tokens=False)["input_ids"] + [reward_tok.eos_token_id]
            for p, a in zip(prompts, answers)]
    T = max(map(len, rows))
    r_ids = torch.tensor([r + [0] * (T - len(r)) for r in rows])
    r_mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    want = sequence_scores(rm(r_ids, r_mask), r_mask)
    torch.testing.assert_close(got, want)
    # Negative control: feeding the actor's ids straight in would score other words.
    naive = sequence_scores(rm(rollout.sequences.clamp(max=len(reward_tok) - 1), rollout.attention_mask), rollout.attention_mask)
    assert not torch.allclose(naive, want)
