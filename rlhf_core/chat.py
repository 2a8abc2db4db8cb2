"""Multi-turn chat with a trained actor, in DeepSpeed-Chat's " Human: ... Assistant:" format or with the
tokenizer's chat template.

    from rlhf_core.chat import Chat
    chat = Chat("file:///.../export/<key>/final")
    chat.send("describe the cat .")      # -> "the cat is calm and kind ."
    chat.send("and the dog ?")           # the history goes along
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlhf_core.config.schema import PromptFormat
from rlhf_core.data.formats import from_messages
from rlhf_core.models.causal_lm import load_causal_lm
from rlhf_core.models.tokenizers import load_saved_tokenizer

@dataclass
class Chat:
    model_ref: str  # local path or store URL of an HF folder (an export, or any causal LM)
    style: PromptFormat = "human_assistant"
    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")
    history: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tokenizer = load_saved_tokenizer(self.model_ref, padding_side="left")
        if self.style == "chat_template" and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{self.model_ref}'s tokenizer has no chat template; use style human_assistant")
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.model = load_causal_lm(self.model_ref, dtype=dtype, what="the chat model").to(self.device).eval()

    def prompt(self) -> str:
        if self.style == "chat_template":
            return self.tokenizer.apply_chat_template(self.history, tokenize=False, add_generation_prompt=True)
        return from_messages(self.history)

    @torch.no_grad()
    def send(self, message: str) -> str:
        """Add a user turn, generate the assistant's answer, remember both; returns the answer."""
        self.history.append({"role": "user", "content": message.strip()})
        ids = self.tokenizer(self.prompt(), return_tensors="pt", add_special_tokens=True).to(self.device)
        kwargs = {"temperature": self.temperature} if self.do_sample else {}
        out = self.model.generate(**ids, max_new_tokens=self.max_new_tokens, do_sample=self.do_sample,
                                  pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
                                  **kwargs)
        answer = self.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        # A model may go on to write the next "Human:" turn itself; the answer ends there.
        answer = answer.split("Human:")[0].split("Assistant:")[0].strip()
        self.history.append({"role": "assistant", "content": answer})
        return answer

    def reset(self) -> None:
        self.history.clear()


def repl(chat: Chat, read=input, write=print) -> None:
    """The interactive loop behind ``rlhf chat``: /reset forgets the history, /exit (or EOF) quits."""
    write(f"Chatting with {chat.model_ref} ({chat.style}). /reset clears the history, /exit quits.")
    while True:
        try:
            line = read("You: ")
        except EOFError:
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            chat.reset()
            write("(history cleared)")
            continue
        if line.strip():
            write("Assistant: " + chat.send(line))
