"""A word-level HF tokenizer covering every word the toy world can emit (built offline with `tokenizers`).

The vocabulary is a function of the generator version only (static word lists + a fixed probe corpus run
through every text generator), never of the data size, so token ids are stable across `make data` runs.
"""

from __future__ import annotations

import string
from collections.abc import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from . import llava, questions, text, world

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
# answer letters stay upper case (added tokens, matched as whole words before lowercasing), so a model answers
# "A" exactly as lmms-eval's SeedBench scorer compares it; every other word is lowercased
CASED_LETTERS = ("A", "B", "C", "D")
CHAT_WORDS = ("USER", "ASSISTANT", "Human", "Assistant", "user", "assistant", "system", llava.SYSTEM_PROMPT,
              questions.SHORT_SUFFIX, questions.MC_SUFFIX, "A B C D E")
MODEL_MAX_LENGTH = 2048
PROBE_SCENES = 1500


def _normalizer():
    return normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])


def _pre_tokenizer():
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated"),
                                    pre_tokenizers.Digits(individual_digits=True)])


def words(texts: Iterable[str]) -> set[str]:
    """The set of vocabulary words in ``texts`` (normalised and pre-tokenised as the tokenizer does)."""
    norm, pre = _normalizer(), _pre_tokenizer()
    chunks: set[str] = set()
    for t in texts:  # the pre-tokenizer splits on whitespace first, so unique chunks give the same words
        chunks.update(t.split())
    out: set[str] = set()
    if chunks:
        out.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str("\n".join(sorted(chunks)))))
    return out


def _static_texts() -> list[str]:
    out = list(CHAT_WORDS) + list(string.punctuation) + list(string.digits)
    out += list(world.SHAPES) + list(world.COLOR_NAMES) + list(world.SIZE_NAMES) + list(world.BACKGROUND_NAMES)
    out += list(world.THEME_NAMES) + list(world.OBJECTS) + list(world.POSITION_NAMES) + list(world.NUMBER_WORDS)
    out += list(world.ROW_NAMES) + list(world.COL_NAMES) + list(questions.PLURALS.values())
    out += [w for syn in text.SHAPE_SYNONYMS.values() for w in syn]
    out += [w for syn in text.COLOR_SYNONYMS.values() for w in syn]
    out += list(text.TAGS) + list(text.IRRELEVANT) + [t.replace("{", " ").replace("}", " ") for t in text.ALT_TEMPLATES]
    out += list(text.JOINERS) + list(questions.REL_CHOICES) + list(questions.REL_PHRASES.values())
    out += list(llava.PRETRAIN_PROMPTS) + list(llava.DETAIL_PROMPTS)
    return out


def probe_texts(n_scenes: int = PROBE_SCENES) -> list[str]:
    """Texts from every generator over a fixed set of scenes (covers the templates' own words)."""
    stats = questions.ObjectStats.from_scenes([world.sample_scene(world.scene_rng(999_983, i)) for i in range(200)])
    out: list[str] = []
    for i in range(n_scenes):
        rng = world.scene_rng(999_983, i, 1)
        scene = world.sample_scene(world.scene_rng(999_983, i))
        out += [text.alt_text(scene, rng) for _ in range(3)]
        out += [text.recaption(scene, rng), text.short_caption(scene)]
        for gen in questions.MC_GENERATORS.values():
            mc = gen(scene, rng)
            if mc is not None:
                out += [mc[0], mc[1], *mc[2]]
        out += [" ".join(questions.short_qa(scene, rng)) for _ in range(4)]
        for rec in (llava.instruct_record("k", "i", scene, rng, stats), llava.text_only_record("k", rng)):
            out += [c["value"] for c in rec["conversations"]]
    return out


def build_vocab() -> list[str]:
    """Specials first (ids 0-4), then every (lowercase) word, sorted, then the cased answer letters."""
    return list(SPECIALS) + sorted(words(_static_texts() + probe_texts()) - set(SPECIALS)) + list(CASED_LETTERS)


def build_tokenizer(vocab: list[str] | None = None) -> Tokenizer:
    """WordLevel model, NFKC + lowercase, whitespace/punctuation/digit pre-tokenisation, ``<s>`` prepended."""
    vocab = vocab or build_vocab()
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.normalizer = _normalizer()
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words, glues punctuation back
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab.index("<s>"))])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tok.add_tokens([AddedToken(c, single_word=True, normalized=False) for c in CASED_LETTERS])
    return tok


def save_tokenizer(out_dir: str, vocab: list[str] | None = None) -> None:
    """Save as a transformers ``PreTrainedTokenizerFast`` (load with ``AutoTokenizer.from_pretrained``)."""

    fast = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(vocab), bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", model_max_length=MODEL_MAX_LENGTH, padding_side="right")
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    fast.save_pretrained(out_dir)


def unknown_words(texts: Iterable[str], vocab: Iterable[str]) -> set[str]:
    return words(texts) - set(vocab)

