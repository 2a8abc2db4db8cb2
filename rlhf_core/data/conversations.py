"""Rows in TRL's and OpenAI's column formats, and whole transcripts, as canonical rows.

A ``files`` source without a ``columns:`` mapping is read in the format its columns name (the first that fits):

=============  ==========================================  =============================================
format         columns                                     each value
=============  ==========================================  =============================================
messages       ``messages``                                OpenAI chat: system/user/assistant messages; the
                                                           last assistant message is the answer (sft, rl)
preference     ``prompt``, ``chosen`` [, ``rejected``]     text, or TRL's conversational messages (prompt:
                                                           the turns so far; chosen/rejected: one assistant
                                                           message)
transcripts    ``chosen``, ``rejected``                    whole transcripts (HH-RLHF's text, or TRL's
                                                           implicit-prompt conversations): the prompt is
                                                           everything before the last assistant turn
completion     ``prompt``, ``completion``                  TRL's prompt-completion (sft, rl)
prompt_only    ``prompt``                                  TRL's prompt-only: rl prompts (``stages: [rl]``)
=============  ==========================================  =============================================

Messages become DeepSpeed-Chat's " Human: ... Assistant:" text (``formats.from_messages``), which
``data.prompt_format`` renders with the actor's chat template or as it is. A pair whose two transcripts do not
share the prompt is dropped and counted (``prompts_differ``), as HH-RLHF holds a few.

A converter returns ``(prompt, chosen, rejected)``; an answer it cannot make is returned as the ``RowError``
that says why, so that the rest of the row can still be used (``on_invalid: drop``).
"""

from __future__ import annotations

from typing import Any, Callable

from rlhf_core.data.errors import RowError
from rlhf_core.data.formats import ASSISTANT_CUE, as_answer, from_messages, human_prompt, split_transcript

ROLES = ("system", "user", "assistant")
Converted = tuple[Any, Any, Any]  # (prompt, chosen | RowError | None, rejected | RowError | None)

FILE_FORMATS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "preference": ("prompt", "chosen"),
    "transcripts": ("chosen", "rejected"),
    "completion": ("prompt", "completion"),
    "prompt_only": ("prompt",),
}


def detect_format(names: set[str]) -> str | None:
    """The first of FILE_FORMATS whose columns the file has, or None."""
    return next((fmt for fmt, cols in FILE_FORMATS.items() if set(cols) <= names), None)


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def part(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, or the RowError it raised (an answer that cannot be made leaves the rest of the row)."""
    try:
        return fn(*args)
    except RowError as e:
        return e


# ----------------------------------------------------------------------------------------------- pieces


def messages_of(value: Any, column: str, where: str = "row") -> list[dict[str, str]]:
    """A list of ``{role, content}`` messages with text content and known roles."""
    if not isinstance(value, list) or not value:
        raise RowError(f"column {column!r} is {short(value)}; expected a non-empty list of {{role, content}} "
                       "messages", "wrong_type", where)
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RowError(f"{column}[{i}] is {short(m)}; expected a {{role, content}} message with text content",
                           "wrong_type", where)
        if m["role"] not in ROLES:
            raise RowError(f"{column}[{i}] has role {m['role']!r}; the roles read are {', '.join(ROLES)}",
                           "unknown_role", where)
        out.append({"role": m["role"], "content": m["content"]})
    return out


def text_prompt(text: str) -> str:
    """A text prompt as canonical text: DeepSpeed-Chat's text (ending in the 'Assistant:' cue) is kept, a
    plain question is wrapped in it, and a transcript (turns, but no cue at the end) is refused."""
    stripped = text.strip()
    if stripped.endswith(ASSISTANT_CUE):
        return text
    if stripped.startswith("Human:") or "\n\nHuman:" in text:
        raise RowError("the prompt has Human:/Assistant: turns but does not end with the 'Assistant:' cue: it looks "
                       "like a whole transcript. For chosen/rejected transcripts (HH-RLHF) leave columns: out (they "
                       "are split at the last Assistant turn); else end prompts with 'Assistant:'",
                       "transcript_as_prompt")
    return human_prompt(stripped)


def prompt_of(value: Any, column: str = "prompt") -> str:
    """A prompt given as text or as messages (which must end with the user's turn)."""
    if isinstance(value, str):
        return text_prompt(value)
    msgs = messages_of(value, column)
    if msgs[-1]["role"] != "user":
        raise RowError(f"{column} ends with a {msgs[-1]['role']} message; a prompt ends with the user's turn to "
                       "answer", "unconvertible")
    return from_messages(msgs)


def answer_of(value: Any, column: str, where: str) -> Any:
    """An answer given as text or as one assistant message (None stays None)."""
    if value is None or isinstance(value, str):
        if isinstance(value, str) and (value.lstrip().startswith("Human:") or "\n\nHuman:" in value):
            raise RowError(f"{column} holds a 'Human:' turn: it looks like a whole transcript; for chosen/rejected "
                           "transcripts leave columns: out (they are split at the last Assistant turn)",
                           "transcript_as_answer", where)
        return as_answer(value)
    msgs = messages_of(value, column, where)
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        roles = ", ".join(m["role"] for m in msgs)
        raise RowError(f"{column} holds messages ({roles}); an answer is one assistant message", "unconvertible",
                       where)
    return as_answer(msgs[0]["content"])


def split_pair(chosen: Any, rejected: Any) -> Converted:
    """Two whole transcripts (text or conversations) -> the shared prompt and the two last answers.

    Raises:
        RowError: ``prompts_differ`` (always dropped and counted) when the two do not share the prompt.
    """
    if isinstance(chosen, str) and isinstance(rejected, str):
        try:
            (p_c, a_c), (p_r, a_r) = split_transcript(chosen), split_transcript(rejected)
        except ValueError as e:
            raise RowError(f"a transcript cannot be split: {e}", "unconvertible") from None
        if p_c != p_r:
            raise RowError("the chosen and rejected transcripts do not share the prompt", "prompts_differ",
                           always_drop=True)
        return p_c, as_answer(a_c), as_answer(a_r)
    c, r = messages_of(chosen, "chosen"), messages_of(rejected, "rejected")
    for column, msgs in (("chosen", c), ("rejected", r)):
        if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
            raise RowError(f"{column} must be a conversation that ends with the assistant's answer", "unconvertible")
    if c[:-1] != r[:-1]:
        raise RowError("the chosen and rejected conversations do not share the prompt", "prompts_differ",
                       always_drop=True)
    return prompt_of(c[:-1], "chosen"), as_answer(c[-1]["content"]), as_answer(r[-1]["content"])


# ------------------------------------------------------------------------------------------- converters


def _messages(r: dict) -> Converted:
    msgs = messages_of(r["messages"], "messages")
    if msgs[-1]["role"] != "assistant":
        raise RowError(f"messages ends with a {msgs[-1]['role']} message; the last message must be the assistant's "
                       "answer", "unconvertible")
    return prompt_of(msgs[:-1], "messages"), as_answer(msgs[-1]["content"]), None


def _preference(r: dict) -> Converted:
    return (prompt_of(r["prompt"]), part(answer_of, r["chosen"], "chosen", "answer"),
            part(answer_of, r.get("rejected"), "rejected", "pair"))


def _transcripts(r: dict) -> Converted:
    return split_pair(r["chosen"], r["rejected"])


def _completion(r: dict) -> Converted:
    return prompt_of(r["prompt"]), part(answer_of, r["completion"], "completion", "answer"), None


def _prompt_only(r: dict) -> Converted:
    return prompt_of(r["prompt"]), None, None


CONVERTERS: dict[str, Callable[[dict], Converted]] = {
    "messages": _messages, "preference": _preference, "transcripts": _transcripts, "completion": _completion,
    "prompt_only": _prompt_only,
}


def mapped_converter(columns: dict[str, str]) -> Callable[[dict], Converted]:
    """A converter for a ``columns:`` mapping (canonical name -> the file's column)."""
    p, c, rj = columns["prompt"], columns["chosen"], columns.get("rejected")

    def convert(r: dict) -> Converted:
        prompt = r[p]
        if not isinstance(prompt, (str, list)):
            raise RowError(f"column {p!r} is {type(prompt).__name__} ({short(prompt)}), expected text or messages",
                           "wrong_type")
        return (prompt_of(prompt, p), part(answer_of, r[c], c, "answer"),
                part(answer_of, r.get(rj), rj, "pair") if rj else None)

    return convert
