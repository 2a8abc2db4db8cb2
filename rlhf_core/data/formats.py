"""Prompt formats: DeepSpeed-Chat's " Human: ... Assistant:" text and the tokenizer's chat template.

Canonical rows keep DeepSpeed-Chat's text, which carries multi-turn histories as alternating
"Human:" / "Assistant:" markers. ``to_messages`` recovers the turns so that the same row can be rendered
with any tokenizer's chat template.
"""

from __future__ import annotations

import re

from rlhf_core.config.schema import PromptFormat

_MARKER = re.compile(r"(?:^|\s)(Human|Assistant):")
_ROLE = {"Human": "user", "Assistant": "assistant"}


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
    """Messages -> DeepSpeed-Chat text ending in the " Assistant:" generation cue."""
    text = "".join(f" {'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages
                   if m["role"] in ("user", "assistant"))
    return text + " Assistant:"


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
