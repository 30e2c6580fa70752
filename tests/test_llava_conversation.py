"""Templates and label masking: only assistant tokens and the EOS that closes each answer are learned."""

import pytest

from llava_bridge import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_bridge.conversation import (
    VICUNA_SYSTEM,
    BadRecord,
    Rendered,
    TokenizationMismatch,
    generation_prompt,
    normalize_turns,
    render,
    tokenize_conversation,
    tokenize_rendered,
)
from tests.llava_fixtures import *  # noqa: F403 (pytest fixtures)

QA = [{"from": "human", "value": "Is there a red circle?\n<image>"}, {"from": "gpt", "value": "Yes"}]


def ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def test_vicuna_v1_hand_checked(word_tokenizer):
    tok = word_tokenizer
    input_ids, labels = tokenize_conversation(tok, "vicuna_v1", QA, True, "s0")
    expected = ([tok.bos_token_id] + ids(tok, VICUNA_SYSTEM) + ids(tok, "USER:") + [IMAGE_TOKEN_INDEX]
                + ids(tok, "Is there a red circle? ASSISTANT:") + ids(tok, "yes") + [tok.eos_token_id])
    assert input_ids == expected
    n_prompt = len(expected) - 2
    assert labels == [IGNORE_INDEX] * n_prompt + ids(tok, "yes") + [tok.eos_token_id]


def test_vicuna_v1_multi_turn_learns_every_answer_and_eos(word_tokenizer):
    tok = word_tokenizer
    conv = QA + [{"from": "human", "value": "What shape is it?"}, {"from": "gpt", "value": "A circle."}]
    input_ids, labels = tokenize_conversation(tok, "vicuna_v1", conv, True, "s1")
    learned = [t for t in labels if t != IGNORE_INDEX]
    assert learned == ids(tok, "yes") + [tok.eos_token_id] + ids(tok, "a circle.") + [tok.eos_token_id]
    # the learned tokens sit exactly where the answers are in input_ids
    assert all(lab in (IGNORE_INDEX, i) for lab, i in zip(labels, input_ids))
    assert input_ids.count(IMAGE_TOKEN_INDEX) == 1


def test_plain_hand_checked(word_tokenizer):
    tok = word_tokenizer
    conv = [{"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": "A red circle."}]
    input_ids, labels = tokenize_conversation(tok, "plain", conv, True, "p0")
    cap = ids(tok, "a red circle.")
    assert input_ids == [tok.bos_token_id, IMAGE_TOKEN_INDEX] + cap  # the human prompt is dropped
    assert labels == [IGNORE_INDEX, IGNORE_INDEX] + cap


def test_text_only_record(word_tokenizer):
    conv = [{"from": "human", "value": "How many sides does a square have?"}, {"from": "gpt", "value": "Four."}]
    input_ids, labels = tokenize_conversation(word_tokenizer, "vicuna_v1", conv, False, "t0")
    assert IMAGE_TOKEN_INDEX not in input_ids
    assert [t for t in labels if t != IGNORE_INDEX] == ids(word_tokenizer, "four.") + [word_tokenizer.eos_token_id]


def test_llama_sentencepiece_masking(llama_sp_tokenizer):
    tok = llama_sp_tokenizer
    conv = QA + [{"from": "human", "value": "Color?"}, {"from": "gpt", "value": "It is red."}]
    input_ids, labels = tokenize_conversation(tok, "vicuna_v1", conv, True, "sp0")
    assert input_ids[0] == tok.bos_token_id and input_ids.count(IMAGE_TOKEN_INDEX) == 1
    learned = [t for t in labels if t != IGNORE_INDEX]
    assert tok.convert_ids_to_tokens(learned) == ["▁Yes", "</s>", "▁It", "▁is", "▁red", ".", "</s>"]
    assert learned.count(tok.eos_token_id) == 2
    # "ASSISTANT:" itself is never learned
    assert tok.convert_tokens_to_ids(":") not in learned


def test_straddling_token_raises_naming_sample(word_tokenizer):
    rendered = Rendered("hello world", ((0, 8),), (False,))  # the span ends inside "world"
    with pytest.raises(TokenizationMismatch, match="sample 'bad-7'"):
        tokenize_rendered(word_tokenizer, rendered, "bad-7")


def test_eos_not_atomic_raises(word_tokenizer):
    rendered = Rendered("hi assistant: yes <s", ((13, 20),), (True,))  # answer does not end in </s>
    with pytest.raises(TokenizationMismatch, match="does not end with the EOS token"):
        tokenize_rendered(word_tokenizer, rendered, "x1")


def test_chat_template(word_tokenizer):
    tok = word_tokenizer
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    try:
        input_ids, labels = tokenize_conversation(tok, "chat_template", QA, True, "c0")
        assert [t for t in labels if t != IGNORE_INDEX] == ids(tok, "yes") + [tok.eos_token_id]
        prompt = generation_prompt("chat_template", "Is it red?", True, tok)
        assert prompt == "user: <image>\nIs it red?</s>assistant:"
    finally:
        tok.chat_template = None


def test_normalize_moves_placeholder_and_rejects_bad_records():
    turns = normalize_turns(QA, has_image=True)
    assert turns[0] == ("human", "<image>\nIs there a red circle?")
    turns = normalize_turns([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}], True)
    assert turns[0][1] == "<image>\nHi"  # added when missing
    for conv, has_image in [([{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}], False),
                            (QA, False), ([QA[0]], True), ("nope", True),
                            ([{"from": "human", "value": "<image> <image>"}, QA[1]], True)]:
        with pytest.raises(BadRecord):
            normalize_turns(conv, has_image)


def test_generation_prompt_matches_training_prefix(word_tokenizer):
    text = render("vicuna_v1", normalize_turns(QA, True), word_tokenizer).text
    prompt = generation_prompt("vicuna_v1", "Is there a red circle?", True, word_tokenizer)
    assert text.startswith(prompt) and prompt.endswith("ASSISTANT:")
    assert generation_prompt("plain", "whatever", True) == "<image>"
