"""Prompt formats: DeepSpeed-Chat's " Human: ... Assistant:" text and the tokenizer's chat template.

Canonical rows keep DeepSpeed-Chat's text, which carries multi-turn histories as alternating
"Human:" / "Assistant:" markers (a system message is the text before the first marker). ``to_messages``
recovers the turns so that the same row can be rendered with any tokenizer's chat template; ``from_messages``
writes messages as that text. A turn whose own text contains "Human:" or "Assistant:" cannot be told from a
marker: such text is cut into more turns by ``to_messages``.
"""

from __future__ import annotations

import re

from rlhf_core.config.schema import PromptFormat

_MARKER = re.compile(r"(?:^|\s)(Human|Assistant):")
_ROLE = {"Human": "user", "Assistant": "assistant"}
ASSISTANT_CUE = "Assistant:"


def human_prompt(question: str) -> str:
    """A plain question as DeepSpeed-Chat's prompt text: ``' Human: <question> Assistant:'``."""
    return " Human: " + question + " " + ASSISTANT_CUE


def as_answer(text):
    """An answer as DeepSpeed-Chat's canonical rows hold it: one leading space (None and blank text as they are)."""
    return " " + text.lstrip() if isinstance(text, str) and text.strip() else text


def split_transcript(text: str) -> tuple[str, str]:
    """A whole transcript -> (the multi-turn prompt up to and including the last assistant cue, the answer after it).

    ``'\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant: d'`` -> (``'...Human: c\\n\\nAssistant:'``, ``' d'``):
    HH-RLHF's split as TRL and OpenRLHF make it (at the last ``"\\n\\nAssistant:"``; at the last
    ``"Assistant:"`` when there is none).

    Raises:
        ValueError: the text has no assistant turn.
    """
    i = text.rfind("\n\n" + ASSISTANT_CUE)
    i = text.rfind(ASSISTANT_CUE) if i < 0 else i + 2
    if i < 0:
        raise ValueError("it has no 'Assistant:' turn")
    cut = i + len(ASSISTANT_CUE)
    return text[:cut], text[cut:]


def to_messages(prompt: str) -> list[dict[str, str]]:
    """' Human: hi Assistant: hello Human: how? Assistant:' -> user/assistant/user messages.

    The trailing empty "Assistant:" (the generation cue) is dropped; text with no markers is one user turn.
    """
    parts = _MARKER.split(prompt)
    if len(parts) == 1:
        return [{"role": "user", "content": prompt.strip()}]
    messages = []
    if parts[0].strip():  # text before the first marker: a system-like preamble
        messages.append({"role": "system", "content": parts[0].strip()})
    for speaker, text in zip(parts[1::2], parts[2::2]):
        messages.append({"role": _ROLE[speaker], "content": text.strip()})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


def from_messages(messages: list[dict[str, str]]) -> str:
    """Messages -> DeepSpeed-Chat text ending in the " Assistant:" generation cue; system messages become the
    text before the first turn (which ``to_messages`` reads back as the system message)."""
    system = " ".join(m["content"].strip() for m in messages if m["role"] == "system")
    text = "".join(f" {'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages
                   if m["role"] in ("user", "assistant"))
    return (system + text if system else text) + " " + ASSISTANT_CUE


def render_prompt(prompt: str, style: PromptFormat, tokenizer) -> str:
    """The prompt text a model sees, in the configured format."""
    if style == "human_assistant":
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"prompt_format chat_template needs a tokenizer with a chat template; "
            f"{getattr(tokenizer, 'name_or_path', 'this tokenizer')} has none. Use prompt_format: human_assistant"
        )
    return tokenizer.apply_chat_template(to_messages(prompt), tokenize=False, add_generation_prompt=True)


def render_answer(answer: str, style: PromptFormat) -> str:
    """Answers follow the rendered prompt; chat templates end with their own separator."""
    return answer if style == "human_assistant" else answer.lstrip()
