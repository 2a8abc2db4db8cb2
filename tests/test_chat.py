import pytest

from rlhf_core.chat import Chat, context_length, repl
from rlhf_core.storage.store import Store
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def sft_model(tiny_trained):
    return Store.from_config(tiny_trained["cfg"].storage).fetch("sft", tiny_trained["sft"].key, "model")


@pytest.mark.slow
def test_chat_keeps_the_history_in_human_assistant_format(sft_model):
    chat = Chat(sft_model, max_new_tokens=16)
    first = chat.send("describe the cat .")
    assert first.split()[:2] == ["the", "cat"], first
    chat.send("what is the river like ?")
    assert chat.prompt().startswith(" Human: describe the cat . Assistant: " + first + " Human: what is the river")
    assert len(chat.history) == 4
    chat.reset()
    assert chat.history == []


@pytest.mark.slow
def test_chat_template_style(sft_model):
    chat = Chat(sft_model, style="chat_template", max_new_tokens=16)
    assert chat.send("tell me about the dog .").split()[:2] == ["the", "dog"]
    assert chat.prompt().startswith("Human: tell me about the dog . Assistant: the dog")


@pytest.mark.slow
def test_repl_reads_until_exit(sft_model):
    lines = iter(["describe the lake .", "/reset", "/exit", "never read"])
    out = []
    repl(Chat(sft_model, max_new_tokens=8), read=lambda _: next(lines), write=out.append)
    assert out[1].startswith("Assistant: the lake") and out[2] == "(history cleared)" and len(out) == 3


# ------------------------------------------------------------- the model's context and what users type
# A random tiny actor (64 positions, like the tiny profile's): what it says does not matter here, only that
# nothing a user types ends the chat with a traceback.


@pytest.fixture(scope="module")
def random_actor(tmp_path_factory):
    from rlhf_core.models.causal_lm import build_causal_lm, save_causal_lm
    from rlhf_core.models.tokenizers import load_tokenizer

    cfg = tiny_config(tmp_path_factory.mktemp("store"))
    tok = load_tokenizer(cfg.models.actor)
    path = tmp_path_factory.mktemp("actor") / "model"
    save_causal_lm(build_causal_lm(cfg.models.actor, tok), tok, str(path))
    return str(path)


TURNS = ["describe the cat .", "what is the river like ?", "and the dog ?", "tell me about the lake ."]


def test_the_third_turn_fits_the_64_positions(random_actor):
    chat = Chat(random_actor)  # 128 new tokens asked, as `rlhf chat` asks by default
    assert chat.context == 64 == context_length(chat.model, chat.tokenizer)
    for message in TURNS:
        history, ids, turn = chat.fit(message)
        assert len(ids) + turn.answer_budget <= 64 and turn.answer_budget >= 32  # half the context kept for it
        assert history[-1]["content"] == message
        chat.answer(message)
    assert chat.history[-2]["content"] == TURNS[-1] and len(chat.history) < 2 * len(TURNS)  # the oldest went


def test_negative_control_without_trimming_the_third_turn_crashes(random_actor):
    """The crash of the issue, shown: told the model has more positions than it has, the chat keeps the whole
    history and the third turn indexes past the position table."""
    chat = Chat(random_actor, context=10_000)
    with pytest.raises(IndexError, match="index out of range"):
        for message in TURNS[:3]:
            chat.send(message)


def test_a_message_longer_than_the_context_keeps_its_end(random_actor):
    chat = Chat(random_actor, max_new_tokens=8)
    long = " ".join(["the cat is calm ."] * 200) + " the dog"
    history, ids, turn = chat.fit(long)
    assert turn.message_cut_to is not None and 0 < turn.message_cut_to < 1000
    assert len(ids) + turn.answer_budget <= 64 and history[0]["content"].endswith("the dog")
    assert isinstance(chat.send(long), str)


def scripted(typed):
    """A ``read`` for ``repl`` that returns the typed lines in turn and raises the exceptions among them."""
    def read(_prompt):
        item = next(typed)
        if isinstance(item, BaseException):
            raise item
        return item
    return read


def test_what_users_type_never_ends_the_chat_with_a_traceback(random_actor):
    """Empty lines, unicode, a very long line, a line that is not UTF-8, Ctrl-C during an answer, then EOF."""
    chat = Chat(random_actor, max_new_tokens=4)
    typed = iter(["", "   ", "héllo 猫 🐱 ?", "word " * 5000, UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
                  "describe the cat .", "/reset", "and the dog ?", EOFError()])
    out = []
    repl(chat, read=scripted(typed), write=out.append)
    answers = [o for o in out if o.startswith("Assistant: ")]
    assert len(answers) == 4, out
    assert any("your message was cut to its last" in o for o in out)
    assert any("not valid UTF-8" in o for o in out) and "(history cleared)" in out
    assert out[-1] == ""  # EOF: a newline, then the chat ends


def test_ctrl_c_stops_an_answer_and_keeps_the_history_then_quits_at_the_prompt(random_actor, monkeypatch):
    chat = Chat(random_actor, max_new_tokens=4)
    chat.send("describe the cat .")
    before = list(chat.history)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(chat.model, "generate", interrupted)
    typed = iter(["and the dog ?", KeyboardInterrupt()])
    out = []
    repl(chat, read=scripted(typed), write=out.append)
    assert "(answer stopped; the history is as it was)" in out and chat.history == before


def test_a_failing_answer_is_one_line_and_the_chat_goes_on(random_actor, monkeypatch):
    chat = Chat(random_actor, max_new_tokens=4)
    real = chat.model.generate
    calls = []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return real(*a, **k)

    monkeypatch.setattr(chat.model, "generate", flaky)
    typed = iter(["describe the cat .", "describe the cat .", "/exit"])
    out = []
    repl(chat, read=lambda _: next(typed), write=out.append)
    assert "(could not answer: RuntimeError: out of memory)" in out
    assert sum(o.startswith("Assistant: ") for o in out) == 1 and len(chat.history) == 2


def test_rlhf_chat_refuses_a_missing_model_in_one_line(capsys, tmp_path):
    from flows.cli import main

    assert main(["chat", "--model", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlhf: ") and "nothing" in err and "Traceback" not in err
