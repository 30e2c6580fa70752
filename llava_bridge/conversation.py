"""Conversation templates and tokenization with label masking (LLaVA-1.5's `plain` and `vicuna_v1`, or the
LLM's own chat template).

A conversation is rendered to one string plus the character spans that are learned (the assistant answers and
the separator that closes each answer). Tokens are labelled from the tokenizer's offset mapping: a token is
learned when its characters lie inside a learned span. A token that straddles a span boundary, an answer that
yields no learned token, or an answer whose closing EOS did not tokenize as the EOS token raises
:class:`TokenizationMismatch` naming the sample — nothing is masked silently (LLaVA masks the whole sample and
prints a warning instead).

``<image>`` placeholders are cut out before tokenizing: each text chunk is tokenized on its own (as LLaVA's
``tokenizer_image_token`` does) and ``IMAGE_TOKEN_INDEX`` (−200) is put between the chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from llava_bridge import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
TEMPLATES = ("plain", "vicuna_v1", "chat_template")
HUMAN, GPT = "human", "gpt"


class TokenizationMismatch(ValueError):
    """The tokenization of a sample does not line up with its learned spans; names the sample."""

    def __init__(self, sample_id: str, detail: str):
        super().__init__(f"tokenization mismatch in sample {sample_id!r}: {detail}")
        self.sample_id = sample_id


class BadRecord(ValueError):
    """A LLaVA record that cannot be used (wrong structure); ``reason`` is a SkipStats tag."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Rendered:
    text: str
    spans: tuple[tuple[int, int], ...]  # learned character spans [start, end)
    eos_spans: tuple[bool, ...]  # per span: must its last learned token be the EOS token?


def normalize_turns(conversations: Sequence[dict], has_image: bool) -> list[tuple[str, str]]:
    """``[{from, value}]`` → ``[(role, text)]`` with roles alternating human/gpt, starting with human.

    As LLaVA's ``preprocess_multimodal``: with an image, the placeholder is moved to the start of its turn
    (``"<image>\\n" + text``) and added to the first human turn if absent. Raises :class:`BadRecord`.
    """
    if not isinstance(conversations, list | tuple) or len(conversations) < 2:
        raise BadRecord("bad_record", "conversations must be a list of at least 2 turns")
    turns: list[tuple[str, str]] = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise BadRecord("bad_record", f"turn {i} has no string 'value'")
        role = {"human": HUMAN, "user": HUMAN, "gpt": GPT, "assistant": GPT}.get(str(turn.get("from", "")).lower())
        if role != (HUMAN if i % 2 == 0 else GPT):
            raise BadRecord("bad_record", f"turn {i} is from {turn.get('from')!r}; expected alternating human/gpt")
        turns.append((role, turn["value"]))
    if len(turns) % 2:
        turns = turns[:-1]  # a trailing human turn has nothing to learn (LLaVA drops it too)
    n_placeholders = sum(t.count(IMAGE_PLACEHOLDER) for _, t in turns)
    if not has_image:
        if n_placeholders:
            raise BadRecord("bad_record", "text-only record contains an <image> placeholder")
        return turns
    if n_placeholders > 1:
        raise BadRecord("bad_record", f"{n_placeholders} <image> placeholders for one image")
    if any(IMAGE_PLACEHOLDER in t for r, t in turns if r == GPT):
        raise BadRecord("bad_record", "an <image> placeholder in an assistant turn")
    for i, (role, text) in enumerate(turns):
        if IMAGE_PLACEHOLDER in text:
            turns[i] = (role, IMAGE_PLACEHOLDER + "\n" + text.replace(IMAGE_PLACEHOLDER, "").strip())
    if not n_placeholders:
        turns[0] = (HUMAN, IMAGE_PLACEHOLDER + "\n" + turns[0][1].strip())
    return turns


def render(template: str, turns: Sequence[tuple[str, str]], tokenizer=None) -> Rendered:
    """The training string and its learned spans for ``template``."""
    if template == "plain":
        # LLaVA `plain`: the human turn is replaced by the bare placeholder; image + caption + "\n", caption learned.
        has_image = IMAGE_PLACEHOLDER in turns[0][1]
        head = IMAGE_PLACEHOLDER if has_image else ""
        text = head + turns[1][1] + "\n"
        return Rendered(text, ((len(head), len(text)),), (False,))
    if template == "vicuna_v1":
        eos = _eos_text(tokenizer)
        text, spans = VICUNA_SYSTEM + " ", []
        for i in range(0, len(turns), 2):
            text += "USER: " + turns[i][1] + " ASSISTANT:"
            start = len(text)  # the space before the answer is learned with it (SentencePiece glues it on)
            text += " " + turns[i + 1][1] + eos
            spans.append((start, len(text)))
        return Rendered(text, tuple(spans), (True,) * len(spans))
    if template == "chat_template":
        return _render_chat(turns, tokenizer)
    raise ValueError(f"unknown template {template!r}; choose from {TEMPLATES}")


def generation_prompt(template: str, question: str, has_image: bool, tokenizer=None,
                      history: Sequence[tuple[str, str]] = ()) -> str:
    """The prompt that asks for the next answer (``history`` = earlier (question, answer) pairs)."""
    q = question.replace(IMAGE_PLACEHOLDER, "").strip()
    first = not history
    if template == "plain":
        return IMAGE_PLACEHOLDER if has_image else ""
    if has_image and first:
        q = IMAGE_PLACEHOLDER + "\n" + q
    if template == "vicuna_v1":
        eos = _eos_text(tokenizer)
        text = VICUNA_SYSTEM + " "
        for hq, ha in history:
            text += "USER: " + hq + " ASSISTANT: " + ha + eos
        return text + "USER: " + q + " ASSISTANT:"
    if template == "chat_template":
        messages = []
        for hq, ha in history:
            messages += [{"role": "user", "content": hq}, {"role": "assistant", "content": ha}]
        messages.append({"role": "user", "content": q})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise ValueError(f"unknown template {template!r}; choose from {TEMPLATES}")


def _eos_text(tokenizer) -> str:
    """vicuna_v1's ``sep2``: the tokenizer's EOS text (``</s>`` for Llama/Vicuna/Mistral)."""
    eos = getattr(tokenizer, "eos_token", None) if tokenizer is not None else "</s>"
    if not eos:
        raise ValueError("vicuna_v1 needs a tokenizer with an eos_token")
    return eos


def _render_chat(turns: Sequence[tuple[str, str]], tokenizer) -> Rendered:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("template 'chat_template' needs a tokenizer that has a chat_template")
    messages = [{"role": "user" if r == HUMAN else "assistant", "content": t} for r, t in turns]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    specials = sorted(set(tokenizer.all_special_tokens), key=len, reverse=True)
    spans, cursor = [], 0
    for role, content in turns:
        at = text.find(content, cursor)
        if at < 0:
            raise ValueError(f"chat template dropped or rewrote a {role} message: {content[:40]!r}")
        end = at + len(content)
        if role == GPT:  # learn the answer and the end-of-turn special token right after it, if any
            end += next((len(s) for s in specials if text.startswith(s, end)), 0)
            spans.append((at, end))
        cursor = end
    return Rendered(text, tuple(spans), (False,) * len(spans))


def _bos_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts in front of a text (e.g. ``[bos]``; ``[]`` for Qwen2); computed once per tokenizer."""
    cached = getattr(tokenizer, "_ov3_bos_prefix", None)
    if cached is None:
        cached = _compute_bos_prefix(tokenizer)
        try:
            tokenizer._ov3_bos_prefix = cached
        except AttributeError:  # a tokenizer that takes no attributes: recomputed each time
            pass
    return list(cached)


def _compute_bos_prefix(tokenizer) -> list[int]:
    with_sp = tokenizer("a").input_ids
    without = tokenizer("a", add_special_tokens=False).input_ids
    n = len(with_sp) - len(without)
    return list(with_sp[:n]) if n > 0 and with_sp[n:] == without else []


def encode_chunks(tokenizer, rendered: Sequence[Rendered]) -> list[list[tuple[list[int], list]]]:
    """The (ids, offsets) of every text chunk of every rendered conversation, in one batched tokenizer call (what
    :func:`tokenize_rendered` computes chunk by chunk; many times faster for many short conversations)."""
    chunks = [c for r in rendered for c in r.text.split(IMAGE_PLACEHOLDER) if c]
    enc = tokenizer(chunks, add_special_tokens=False, return_offsets_mapping=True, verbose=False) if chunks else None
    pairs = iter(zip(enc.input_ids, enc.offset_mapping)) if enc is not None else iter(())
    return [[next(pairs) for c in r.text.split(IMAGE_PLACEHOLDER) if c] for r in rendered]


def tokenize_many(tokenizer, rendered: Sequence[Rendered], sample_ids: Sequence[str],
                  max_lengths: Sequence[int | None]) -> list[tuple[list[int], list[int]]]:
    """:func:`tokenize_rendered` of many conversations, their text chunks encoded in one batched call
    (:func:`encode_chunks`): the same ``(input_ids, labels)`` each."""
    return [tokenize_rendered(tokenizer, r, sid, n, encoded=enc)
            for r, sid, n, enc in zip(rendered, sample_ids, max_lengths, encode_chunks(tokenizer, rendered))]


def tokenize_rendered(tokenizer, rendered: Rendered, sample_id: str, max_length: int | None = None,
                      encoded: Sequence[tuple[list[int], list]] | None = None) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)``; ``<image>`` → ``IMAGE_TOKEN_INDEX``; unlearned positions → ``IGNORE_INDEX``.
    ``encoded``: this conversation's chunk encodings from :func:`encode_chunks` (else each chunk is tokenized here)."""
    text = rendered.text
    pre = iter(encoded) if encoded is not None else None
    ids: list[int] = _bos_prefix(tokenizer)
    labels: list[int] = [IGNORE_INDEX] * len(ids)
    spans = rendered.spans
    learned_in_span = [0] * len(spans)
    last_in_span: list[int | None] = [None] * len(spans)
    offset = 0
    for k, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if k:
            ids.append(IMAGE_TOKEN_INDEX)
            labels.append(IGNORE_INDEX)
            offset += len(IMAGE_PLACEHOLDER)
        if chunk:
            if pre is not None:
                chunk_ids, chunk_offsets = next(pre)
            else:
                enc = tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
                chunk_ids, chunk_offsets = enc.input_ids, enc.offset_mapping
            for tok, (s, e) in zip(chunk_ids, chunk_offsets):
                s, e = s + offset, e + offset
                j = _span_of(spans, s, e, sample_id, tokenizer, tok)
                ids.append(tok)
                if j is None:
                    labels.append(IGNORE_INDEX)
                else:
                    labels.append(tok)
                    learned_in_span[j] += 1
                    last_in_span[j] = tok
        offset += len(chunk)
    for j, (s, e) in enumerate(spans):
        if text[s:e].strip() and not learned_in_span[j]:
            raise TokenizationMismatch(sample_id, f"answer {text[s:e][:40]!r} produced no learned token")
        if rendered.eos_spans[j] and last_in_span[j] != tokenizer.eos_token_id:
            raise TokenizationMismatch(
                sample_id, f"answer {text[s:e][-40:]!r} does not end with the EOS token "
                f"{tokenizer.eos_token!r} (id {tokenizer.eos_token_id}); is it a special token of this tokenizer?")
    if max_length is not None and len(ids) > max_length:
        ids, labels = ids[:max_length], labels[:max_length]
    return ids, labels


def _span_of(spans, s: int, e: int, sample_id: str, tokenizer, tok: int) -> int | None:
    """Index of the learned span that holds token chars [s, e), None if outside all; raises on straddling."""
    for j, (a, b) in enumerate(spans):
        inside = a <= s and e <= b and (e > s or a < s < b)
        if inside:
            return j
        if s < b and e > a and e > s:  # overlaps the span without being inside it
            raise TokenizationMismatch(
                sample_id, f"token {tokenizer.convert_ids_to_tokens(tok)!r} at chars [{s},{e}) straddles the "
                f"boundary of the learned span [{a},{b})")
    return None


def tokenize_conversation(tokenizer, template: str, conversations: Sequence[dict], has_image: bool,
                          sample_id: str, max_length: int | None = None) -> tuple[list[int], list[int]]:
    """Normalise, render and tokenize one LLaVA record's ``conversations``."""
    turns = normalize_turns(conversations, has_image)
    return tokenize_rendered(tokenizer, render(template, turns, tokenizer), sample_id, max_length)
