"""The toy world's language model: a tiny Llama-architecture LM on the toy word-level tokenizer, pretrained on toy
text so that LLaVA stage 1 starts from a language model (as the real recipe starts from Vicuna).

    python -m llava_bridge.toy_llm --config configs/llava/toy_llm.yaml      # = make toy-llm

Corpus: the train split's instruction records rendered in the ``vicuna_v1`` chat format with each image replaced by
its short caption (the chat-tuned-LM analogue: Vicuna answers questions about a scene described in its context;
stage 1 then teaches the projector to put the image where the description was). Documents
are tokenized, joined and cut into fixed blocks (nanoGPT style); the loss is on every token. Then, as Vicuna is a
chat-finetuned Llama, ``sft_steps`` of supervised finetuning on the short-answer questions (answers of at most
``sft_max_answer_words`` words) with the scene's caption in the user turn and the loss on the answer only: a tiny LM
learns to look things up in its context far sooner this way (measured: yes/no questions answered from the caption
0.84 after 1,500 SFT steps vs 0.51–0.55 after LM pretraining alone). Optionally (``sft_mc_samples``) the SFT pool
also gets synthetic 4-choice samples: the toy world's own SeedBench question generators on the train scenes, with
the scene's detailed description (or short caption) in the user turn and the letter as the answer. Then ``mc_steps`` on
those 4-choice samples alone (``mc_context``: the short caption). Measured at the ``tiny`` size (issue 16; the
test scenes' SeedBench questions, 300 of them, the scene's caption in the user turn, teacher-forced letter): the
mixed SFT alone (1,500 steps with 40k 4-choice samples) picks the right letter 0.30 of the time, mostly "A"
(chance 0.25); 1,000 more 4-choice-only steps with the short caption in context: 0.42 (scene, identity,
attribute, counting 0.48–0.54; location and spatial relations, which a short caption does not describe, 0.24–0.26),
0.22 with no caption (the blind control). Through LLaVA (stage 1 + 2 on the OV3 encoder, images instead of
captions) that skill does not survive, and the 4-choice phases cost more than they give: letter 23.3 % with them
vs 28.1 % without, likelihood ranking 47.7 vs 53.6 %, POPE F1 60.1 vs 68.0, the toy LLM 914 vs 357 s; the toy
config leaves them off. Output: a transformers folder
(``LlamaForCausalLM`` + the tokenizer) that ``AutoModelForCausalLM`` loads.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from llava_bridge import IMAGE_PLACEHOLDER
from llava_bridge.conversation import BadRecord, normalize_turns, render, tokenize_many
from llava_bridge.data import Collator
from ov3common.config import choice_field, parse_cli, path_field, save_config
from ov3common.dist import seed_all
from ov3common.log import MetricLogger, TrainProgress, get_logger
from ov3common.optim import build_adamw, warmup_cosine
from ov3common.toyworld import load_scenes
from ov3common.toyworld.questions import LETTERS, MC_GENERATORS, arrange, mc_prompt

log = get_logger("llava_bridge.toy_llm")
SIZES = {  # hidden, layers, heads, intermediate
    "tiny": (64, 2, 2, 172),
    "mini": (64, 4, 2, 172),
    "toy": (128, 4, 4, 344),
    "small": (256, 6, 8, 688),
}


@dataclass
class ToyLLMConfig:
    """Pretrain the toy LM."""

    RENAMED = {"out": "out_dir"}
    tokenizer: str = path_field("data/toy/tokenizer", "dir")
    data: list[str] = field(default_factory=lambda: ["data/toy/llava/instruct.json"])
    captions: str = "data/toy/llava/pretrain.json"  # image id -> short caption (the image's stand-in in the text)
    out_dir: str = "runs/toy/llm"
    size: str = "toy"
    max_docs: int = 20000  # documents taken from the corpus (0 = all)
    block: int = 256
    batch_size: int = 16
    steps: int = 120
    lr: float = 3e-3
    warmup: int = 20
    weight_decay: float = 0.1
    seed: int = 0
    threads: int = 0  # torch threads (0 = torch default)
    compile: bool = False  # torch.compile (inductor) the LM in place for the training phases
    tensorboard: bool = False  # also write the metrics as TensorBoard scalars to <out_dir>/tb
    sft_steps: int = 0  # supervised finetuning on short answers after pretraining (0 = none)
    sft_batch_size: int = 64
    sft_lr: float = 3e-3
    sft_max_answer_words: int = 3
    # synthetic 4-choice SFT samples: the toy world's SeedBench question generators on the scenes of these shards
    # (webdataset folder; each sample's json has "scene" + the descriptions), with a description in the user turn
    sft_mc_scenes: str = path_field("", "dir")
    sft_mc_samples: int = 0  # how many (0 = none); letters uniform
    sft_mc_context: str = choice_field("recaption", ("recaption", "short_caption"))  # the user turn's description
    # then a last phase on synthetic 4-choice samples only (the letter protocol; scenes from sft_mc_scenes)
    mc_steps: int = 0
    mc_samples: int = 30000
    mc_context: str = choice_field("short_caption", ("recaption", "short_caption"))


def _captions(path: str) -> dict[str, str]:
    by_id: dict[str, str] = {}
    if path:
        for rec in json.loads(Path(path).read_text()):
            conv = rec.get("conversations") or []
            if rec.get("id") is not None and len(conv) >= 2:
                by_id[str(rec["id"])] = conv[1]["value"]
    return by_id


def _with_captions(paths: list[str], captions: str):
    """``(record, caption of its image or "")``; records whose image has no caption are left out."""
    by_id = _captions(captions)
    for p in paths:
        for rec in json.loads(Path(p).read_text()):
            has_image = rec.get("image") is not None
            context = by_id.get(str(rec.get("id")), "") if has_image else ""
            if not has_image or context:
                yield rec, context


def corpus(paths: list[str], tokenizer, max_docs: int, captions: str = "") -> list[str]:
    """Texts: the instruction records in the ``vicuna_v1`` format, each image replaced by its short caption (from
    the ``plain`` records with the same id) — so the LM learns to answer from a scene described in its context,
    as a real LLM reads a description. Records without a caption for their image keep only text-only turns."""
    docs: list[str] = []
    for rec, context in _with_captions(paths, captions):
        conv = [dict(t, value=t["value"].replace(IMAGE_PLACEHOLDER, context).strip()) for t in rec["conversations"]]
        try:
            turns = normalize_turns(conv, has_image=False)
        except BadRecord:
            continue
        docs.append(render("vicuna_v1", turns, tokenizer).text)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(docs), generator=g).tolist()
    return [docs[i] for i in order[: max_docs or None]]


def sft_samples(paths: list[str], tokenizer, captions: str, max_answer_words: int) -> list[dict]:
    """One sample per short-answer turn: ``[caption \n] question`` → answer, labels on the answer and ``</s>`` only."""
    keys, rendered = [], []
    for rec, context in _with_captions(paths, captions):
        try:
            turns = normalize_turns(rec["conversations"], has_image=bool(context))
        except (BadRecord, KeyError):
            continue
        for (_, q), (_, a) in zip(turns[::2], turns[1::2]):
            if len(a.split()) > max_answer_words:
                continue
            q = q.replace(IMAGE_PLACEHOLDER, "").strip()
            user = f"{context}\n{q}" if context else q
            keys.append(str(rec.get("id")))
            rendered.append(render("vicuna_v1", [("human", user), ("gpt", a)], tokenizer))
    return _tokenized(tokenizer, keys, rendered)


def _tokenized(tokenizer, keys: list[str], rendered: list) -> list[dict]:
    """SFT samples (labels on the answers only) of rendered one-turn conversations, tokenized in one batch."""
    return [{"id": key, "input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "image": None}
            for key, (ids, labels) in zip(keys, tokenize_many(tokenizer, rendered, keys, [10_000] * len(keys)))]


def mc_samples(scenes: str, tokenizer, n: int, context: str, seed: int = 0) -> list[dict]:
    """``n`` 4-choice samples ``description \n question + lettered choices`` → letter, from the toy world's own
    SeedBench generators (:mod:`ov3common.toyworld.questions`) on the scenes of the shards in ``scenes``."""
    metas = load_scenes(scenes, "sft_mc_scenes")
    rng = np.random.default_rng(seed)
    gens = list(MC_GENERATORS.values())
    keys, rendered = [], []
    while len(keys) < n:
        meta = metas[int(rng.integers(len(metas)))]
        mc = gens[int(rng.integers(len(gens)))](meta["scene"], rng)
        if mc is None:
            continue
        question, correct, wrong = mc
        letter = int(rng.integers(4))
        user = f"{meta[context]}\n{mc_prompt(question, arrange(correct, wrong, letter, rng))}"
        keys.append(meta["key"])
        rendered.append(render("vicuna_v1", [("human", user), ("gpt", LETTERS[letter])], tokenizer))
    return _tokenized(tokenizer, keys, rendered)


def build_model(size: str, vocab: int, tokenizer):
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    hidden, layers, heads, inter = SIZES[size]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, intermediate_size=inter, max_position_embeddings=2048,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def fit(model, batch_fn, steps: int, lr: float, weight_decay: float, warmup: int, metrics: MetricLogger,
        key: str, step_offset: int, desc: str) -> None:
    """AdamW + warmup/cosine for ``steps`` steps on ``batch_fn()`` (model kwargs); logs ``key`` every 10 steps."""
    opt = build_adamw(model, lr, weight_decay=weight_decay)
    sched = warmup_cosine(opt, warmup, steps, 0.1)
    model.train()
    t0 = time.time()
    bar = TrainProgress(steps, 0, desc, 10, log)
    for step in range(1, steps + 1):
        batch = batch_fn()
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        due = step % 10 == 0 or step == steps
        bar.update(len(batch["input_ids"]), loss.item() if due else None)
        if due:
            metrics.log(step_offset + step, {key: loss.item(), "lr": sched.get_last_lr()[0],
                                             "seconds": time.time() - t0, "samples_per_s": bar.samples_per_s})
    bar.close()
    log.info("%s: final loss %.3f after %d steps (%.0f s)", desc, loss.item(), steps, time.time() - t0)


def main(argv=None) -> int:
    cfg = parse_cli(ToyLLMConfig, argv, description=__doc__)
    for i, p in enumerate(cfg.data):
        if not Path(p).is_file():
            raise FileNotFoundError(f"data.{i}: {p} does not exist — run `make data`")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_all(cfg.seed)
    tok = AutoTokenizer.from_pretrained(cfg.tokenizer)
    docs = corpus(list(cfg.data), tok, cfg.max_docs, cfg.captions)
    ids = [t + [tok.eos_token_id] for t in tok(docs).input_ids]
    flat = torch.tensor([i for d in ids for i in d if i >= 0])
    n_blocks = len(flat) // cfg.block
    blocks = flat[: n_blocks * cfg.block].view(n_blocks, cfg.block)
    log.info("toy LLM corpus: %d documents, %d tokens, %d blocks of %d", len(docs), len(flat), n_blocks, cfg.block)
    model = build_model(cfg.size, len(tok), tok)
    if cfg.compile:  # in place: parameter names and the saved weights are unchanged
        model.compile()
    log.info("toy LLM: %s, %.2fM parameters", cfg.size, sum(p.numel() for p in model.parameters()) / 1e6)
    out = Path(cfg.out_dir)
    save_config(cfg, out / "toy_llm_config.yaml")
    metrics = MetricLogger(out, tensorboard=cfg.tensorboard)
    g = torch.Generator().manual_seed(cfg.seed)

    def lm_batch() -> dict:
        x = blocks[torch.randint(n_blocks, (cfg.batch_size,), generator=g)]
        return {"input_ids": x, "labels": x}

    fit(model, lm_batch, cfg.steps, cfg.lr, cfg.weight_decay, cfg.warmup, metrics, "loss", 0, "toy LLM")
    if cfg.mc_steps and not (cfg.sft_steps and cfg.sft_mc_scenes):
        raise ValueError("mc_steps needs sft_steps > 0 and sft_mc_scenes (the scenes its questions are about)")
    if cfg.sft_steps:
        samples = sft_samples(list(cfg.data), tok, cfg.captions, cfg.sft_max_answer_words)
        if cfg.sft_mc_samples:
            samples += mc_samples(cfg.sft_mc_scenes, tok, cfg.sft_mc_samples, cfg.sft_mc_context, cfg.seed)
        if not samples:
            raise ValueError(f"sft_steps={cfg.sft_steps} but {list(cfg.data)} hold no answers of at most "
                             f"{cfg.sft_max_answer_words} words")
        log.info("toy LLM SFT: %d short-answer samples, %d steps of %d", len(samples), cfg.sft_steps,
                 cfg.sft_batch_size)
        collate = Collator(tok.pad_token_id)

        def sft_batch() -> dict:
            idx = torch.randint(len(samples), (cfg.sft_batch_size,), generator=g).tolist()
            b = collate([samples[i] for i in idx])
            return {k: b[k] for k in ("input_ids", "attention_mask", "labels")}

        fit(model, sft_batch, cfg.sft_steps, cfg.sft_lr, 0.0, cfg.warmup, metrics, "sft_loss", cfg.steps,
            "toy LLM SFT")
        if cfg.mc_steps:
            samples = mc_samples(cfg.sft_mc_scenes, tok, cfg.mc_samples, cfg.mc_context, cfg.seed)
            log.info("toy LLM 4-choice phase: %d samples (%s in context), %d steps of %d", len(samples),
                     cfg.mc_context, cfg.mc_steps, cfg.sft_batch_size)
            fit(model, sft_batch, cfg.mc_steps, cfg.sft_lr, 0.0, cfg.warmup, metrics, "mc_loss",
                cfg.steps + cfg.sft_steps, "toy LLM 4-choice")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
