"""Bundled tokenizer: loads with transformers, round-trips any text, chat template splits prompt/response."""

import pytest

from engine.model import CHAT_TEMPLATE, load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.mark.parametrize(
    "text", ["Mara watched the luminous stars.", "héllo wörld 🙂\n\ttabs", '"quoted," she said; and yet', ""]
)
def test_round_trip(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text


def test_special_tokens(tok):
    assert tok.pad_token == "<|pad|>" and tok.eos_token == "<|end|>" and tok.bos_token == "<|bos|>"
    assert len({tok.pad_token_id, tok.eos_token_id, tok.bos_token_id}) == 3
    assert 500 < len(tok) <= 2048


def test_chat_template_prompt_is_a_prefix(tok):
    assert tok.chat_template == CHAT_TEMPLATE
    msgs = [
        {"role": "user", "content": "Write about the moon."},
        {"role": "assistant", "content": "Theo held the comet."},
    ]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == "<|bos|><|user|>\nWrite about the moon.<|end|>\n<|assistant|>\nTheo held the comet.<|end|>\n"
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    full_ids = tok(text, add_special_tokens=False)["input_ids"]
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids
    assert tok.decode(full_ids[len(prompt_ids) :]) == "Theo held the comet.<|end|>\n"
