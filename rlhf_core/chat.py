"""Multi-turn chat with a trained actor, in DeepSpeed-Chat's " Human: ... Assistant:" format or with the
tokenizer's chat template.

    from rlhf_core.chat import Chat
    chat = Chat("file:///.../export/<key>/final")
    chat.send("describe the cat .")      # -> "the cat is calm and kind ."
    chat.send("and the dog ?")           # the history goes along

The prompt and the answer must fit the model's positions (the tiny actor has 64): before each answer the
oldest turns are forgotten until the prompt leaves room for it, a message too long on its own keeps its
last tokens, and the answer gets what room is left (``Turn`` says what was cut).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlhf_core.config.schema import PromptFormat
from rlhf_core.data.formats import from_messages
from rlhf_core.models.causal_lm import load_causal_lm
from rlhf_core.models.tokenizers import load_saved_tokenizer

# A tokenizer without a known limit reports this huge number (transformers' VERY_LARGE_INTEGER).
_NO_LIMIT = 10**9


def context_length(model, tokenizer) -> int:
    """Positions the model can attend over: its config's, or the tokenizer's limit when that is smaller."""
    cfg = model.config
    n = next((getattr(cfg, k) for k in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")
              if isinstance(getattr(cfg, k, None), int)), _NO_LIMIT)
    limit = getattr(tokenizer, "model_max_length", _NO_LIMIT) or _NO_LIMIT
    return min(n, limit if limit < _NO_LIMIT else n)


@dataclass
class Turn:
    """One answer and what was cut to make room for it."""

    answer: str
    forgotten_turns: int = 0  # oldest user/assistant pairs dropped from the history
    message_cut_to: int | None = None  # the message kept only its last this many tokens
    answer_budget: int = 0  # new tokens the answer was allowed


@dataclass
class Chat:
    model_ref: str  # local path or store URL of an HF folder (an export, or any causal LM)
    style: PromptFormat = "human_assistant"
    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")
    history: list[dict[str, str]] = field(default_factory=list)
    context: int | None = None  # positions to fit prompt + answer into; default: the model's (context_length)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        self.tokenizer = load_saved_tokenizer(self.model_ref, padding_side="left")
        if self.style == "chat_template" and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{self.model_ref}'s tokenizer has no chat template; use style human_assistant")
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.model = load_causal_lm(self.model_ref, dtype=dtype, what="the chat model").to(self.device).eval()
        if self.context is None:
            self.context = context_length(self.model, self.tokenizer)

    def prompt(self, history: list[dict[str, str]] | None = None) -> str:
        history = self.history if history is None else history
        if self.style == "chat_template":
            return self.tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        return from_messages(history)

    def _ids(self, history: list[dict[str, str]]) -> list[int]:
        return self.tokenizer(self.prompt(history), add_special_tokens=True)["input_ids"]

    def fit(self, message: str) -> tuple[list[dict[str, str]], list[int], Turn]:
        """The history to answer from (the oldest turns dropped, the message cut if it alone is too long), its
        token ids, and the room left for the answer: at most ``max_new_tokens``, and never less than the
        smaller of that and half the context."""
        assert self.context is not None
        room = min(self.max_new_tokens, self.context // 2)  # reserved for the answer while the prompt is cut
        turn = Turn("")
        history = [*self.history, {"role": "user", "content": message}]
        ids = self._ids(history)
        while len(ids) > self.context - room and len(history) > 1:
            history = history[2:] if history[0]["role"] == "user" and len(history) > 2 else history[1:]
            turn.forgotten_turns += 1
            ids = self._ids(history)
        if len(ids) > self.context - room:  # the message alone is too long: keep its end
            tokens = self.tokenizer(message, add_special_tokens=False)["input_ids"]
            keep = max(len(tokens) - (len(ids) - (self.context - room)), 0)
            while True:
                text = self.tokenizer.decode(tokens[len(tokens) - keep:]) if keep else ""
                history = [{"role": "user", "content": text}]
                ids = self._ids(history)
                if len(ids) <= self.context - room or keep == 0:
                    break
                keep -= 1
            turn.message_cut_to = keep
        if len(ids) >= self.context:
            raise ValueError(f"the model's {self.context} positions cannot hold even an empty turn "
                             f"({len(ids)} tokens of prompt format)")
        turn.answer_budget = min(self.max_new_tokens, self.context - len(ids))
        return history, ids, turn

    @torch.no_grad()
    def send(self, message: str) -> str:
        """Add a user turn, generate the assistant's answer, remember both; returns the answer."""
        return self.answer(message).answer

    @torch.no_grad()
    def answer(self, message: str) -> Turn:
        """``send``, returning what was cut too. The history changes only once the answer is there (an
        interrupted or failed answer leaves it as it was)."""
        history, ids, turn = self.fit(message.strip())
        inputs = torch.tensor([ids], device=self.device)
        kwargs = {"temperature": self.temperature} if self.do_sample else {}
        out = self.model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs),
                                  max_new_tokens=turn.answer_budget, do_sample=self.do_sample,
                                  pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
                                  **kwargs)
        answer = self.tokenizer.decode(out[0, inputs.shape[1]:], skip_special_tokens=True)
        # A model may go on to write the next "Human:" turn itself; the answer ends there.
        turn.answer = answer.split("Human:")[0].split("Assistant:")[0].strip()
        self.history = [*history, {"role": "assistant", "content": turn.answer}]
        return turn

    def reset(self) -> None:
        self.history.clear()


HELP = "/reset clears the history, /exit (or Ctrl-D) quits, Ctrl-C stops an answer."


def repl(chat: Chat, read=input, write=print) -> None:
    """The interactive loop behind ``rlhf chat``. Nothing a user types ends it with a traceback: empty lines
    are skipped, EOF and Ctrl-C at the prompt quit, Ctrl-C during an answer drops that answer, a message
    longer than the model's context keeps its end (and says so), and an error in an answer is reported in
    one line and the chat goes on."""
    write(f"Chatting with {chat.model_ref} ({chat.style}, {chat.context} positions). {HELP}")
    while True:
        try:
            line = read("You: ")
        except (EOFError, KeyboardInterrupt):
            write("")
            break
        except UnicodeDecodeError as e:  # bytes that are not UTF-8 on a pipe
            write(f"(that line is not valid UTF-8 text: {e.reason}; skipped)")
            continue
        command = line.strip()
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            chat.reset()
            write("(history cleared)")
            continue
        if command in ("/help", "/?"):
            write(HELP)
            continue
        if not command:
            continue
        try:
            turn = chat.answer(line)
        except KeyboardInterrupt:
            write("(answer stopped; the history is as it was)")
            continue
        except Exception as e:  # a model or tokenizer failure on this input: say it, keep the chat
            write(f"(could not answer: {type(e).__name__}: {e})")
            continue
        if turn.forgotten_turns:
            write(f"(forgot the oldest {turn.forgotten_turns} turn(s) to fit the model's {chat.context} positions)")
        if turn.message_cut_to is not None:
            write(f"(your message was cut to its last {turn.message_cut_to} tokens to fit the model's "
                  f"{chat.context} positions)")
        write("Assistant: " + turn.answer)
