import pytest

from rlhf_core.chat import Chat, repl
from rlhf_core.storage.store import Store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sft_model(tiny_trained):
    return Store.from_config(tiny_trained["cfg"].storage).fetch("sft", tiny_trained["sft"].key, "model")


def test_chat_keeps_the_history_in_human_assistant_format(sft_model):
    chat = Chat(sft_model, max_new_tokens=16)
    first = chat.send("describe the cat .")
    assert first.split()[:2] == ["the", "cat"], first
    chat.send("what is the river like ?")
    assert chat.prompt().startswith(" Human: describe the cat . Assistant: " + first + " Human: what is the river")
    assert len(chat.history) == 4
    chat.reset()
    assert chat.history == []


def test_chat_template_style(sft_model):
    chat = Chat(sft_model, style="chat_template", max_new_tokens=16)
    assert chat.send("tell me about the dog .").split()[:2] == ["the", "dog"]
    assert chat.prompt().startswith("Human: tell me about the dog . Assistant: the dog")


def test_repl_reads_until_exit(sft_model):
    lines = iter(["describe the lake .", "/reset", "/exit", "never read"])
    out = []
    repl(Chat(sft_model, max_new_tokens=8), read=lambda _: next(lines), write=out.append)
    assert out[1].startswith("Assistant: the lake") and out[2] == "(history cleared)" and len(out) == 3
