import pytest
from transformers import AutoTokenizer

from rlhf_core.data.formats import from_messages, render_answer, render_prompt, to_messages
from tests.conftest import PROJECT

TOK = AutoTokenizer.from_pretrained(PROJECT / "data" / "tiny_tokenizer")


def test_multi_turn_deepspeed_chat_text_to_messages_and_back():
    text = "\n\nHuman: hi there\n\nAssistant: hello!\n\nHuman: how are you?\n\nAssistant:"
    msgs = to_messages(text)
    assert msgs == [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello!"},
                    {"role": "user", "content": "how are you?"}]
    assert to_messages(from_messages(msgs)) == msgs


def test_plain_question_is_one_user_turn():
    assert to_messages("What is 2+2?") == [{"role": "user", "content": "What is 2+2?"}]


def test_render_in_both_formats():
    prompt = " Human: describe the cat . Assistant:"
    assert render_prompt(prompt, "human_assistant", TOK) == prompt
    assert render_prompt(prompt, "chat_template", TOK) == "Human: describe the cat . Assistant:"
    assert render_answer(" the cat is calm .", "chat_template") == "the cat is calm ."


def test_chat_template_format_needs_a_template():
    tok = AutoTokenizer.from_pretrained(PROJECT / "data" / "tiny_tokenizer")
    tok.chat_template = None
    with pytest.raises(ValueError, match="has none. Use prompt_format: human_assistant"):
        render_prompt(" Human: hi Assistant:", "chat_template", tok)
