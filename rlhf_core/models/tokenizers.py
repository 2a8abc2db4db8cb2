"""Tokenizers: a model spec's tokenizer with a pad token, and the tokenizer a stage saved beside its model."""

from __future__ import annotations

from rlhf_core.config import ModelSpec
from rlhf_core.config.views import TokenizerSpec
from rlhf_core.models.loading import ModelLoadError
from rlhf_core.storage.store import local_copy


def load_tokenizer(spec: TokenizerSpec | ModelSpec, role: str = "actor", padding_side: str = "right"):
    """A model's tokenizer, with a pad token (the spec's when the tokenizer has none)."""
    from transformers import AutoTokenizer

    if isinstance(spec, ModelSpec):
        spec = TokenizerSpec.of(spec)
    ref = spec.tokenizer
    try:
        tok = AutoTokenizer.from_pretrained(
            local_copy(ref), revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
    except Exception as e:  # OSError, ValueError, HTTP errors...
        raise ModelLoadError(f"models.{role}: cannot load tokenizer {ref!r} ({type(e).__name__}: {e})") from None
    if tok.pad_token is None:
        if spec.pad_token is None:
            raise ModelLoadError(
                f"models.{role}: tokenizer {ref!r} has no pad token; set models.{role}.pad_token "
                "(e.g. 'eos' to pad with the end-of-sequence token)"
            )
        token = tok.eos_token if spec.pad_token == "eos" else spec.pad_token
        if token is None or tok.convert_tokens_to_ids(token) in (None, tok.unk_token_id):
            raise ModelLoadError(f"models.{role}.pad_token {spec.pad_token!r} is not in the vocabulary of {ref!r}")
        tok.pad_token = token
    if tok.eos_token is None:
        raise ModelLoadError(f"models.{role}: tokenizer {ref!r} has no end-of-sequence token; answers could never end")
    tok.padding_side = padding_side
    return tok


def load_saved_tokenizer(path: str, padding_side: str = "right", pad_with_eos: bool = False):
    """The tokenizer a stage saved next to its model (it already carries the pad token chosen then), or any
    model's (``pad_with_eos``: one without a pad token pads with its end-of-sequence token)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(local_copy(path))
    except Exception as e:
        raise ModelLoadError(f"cannot load the tokenizer saved in {path} ({type(e).__name__}: {e})") from None
    if tok.pad_token is None and pad_with_eos and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    if tok.pad_token is None:
        raise ModelLoadError(f"the tokenizer saved in {path} has no pad token")
    tok.padding_side = padding_side
    return tok


def same_tokenizer(a, b) -> bool:
    """Whether token ids mean the same in both tokenizers (then no text round trip is needed)."""
    return (a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id and a.bos_token_id == b.bos_token_id
            and getattr(a, "chat_template", None) == getattr(b, "chat_template", None))
