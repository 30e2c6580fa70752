"""The toy world's language model: a tiny Llama-architecture LM on the toy word-level tokenizer, pretrained on toy
text so that LLaVA stage 1 starts from a language model (as the real recipe starts from Vicuna).

    python -m llava_bridge.toy_llm --config configs/llava/toy_llm.yaml      # = make toy-llm

Corpus: the train split's instruction records rendered in the ``vicuna_v1`` chat format with each image replaced by
its short caption (the chat-tuned-LM analogue: Vicuna answers questions about a scene described in its context;
stage 1 then teaches the projector to put the image where the description was). Documents
are tokenized, joined and cut into fixed blocks (nanoGPT style); the loss is on every token. Output: a
transformers folder (``LlamaForCausalLM`` + the tokenizer) that ``AutoModelForCausalLM`` loads.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llava_bridge import IMAGE_PLACEHOLDER
from llava_bridge.conversation import BadRecord, normalize_turns, render
from ov3common.config import parse_cli, path_field, save_config
from ov3common.dist import seed_all
from ov3common.log import MetricLogger, get_logger, progress
from ov3common.optim import build_adamw, warmup_cosine

log = get_logger("llava_bridge.toy_llm")
SIZES = {  # hidden, layers, heads, intermediate
    "tiny": (64, 2, 2, 172),
    "toy": (128, 4, 4, 344),
    "small": (256, 6, 8, 688),
}


@dataclass
class ToyLLMConfig:
    """Pretrain the toy LM."""

    tokenizer: str = path_field("data/toy/tokenizer", "dir")
    data: list[str] = field(default_factory=lambda: ["data/toy/llava/instruct.json"])
    captions: str = "data/toy/llava/pretrain.json"  # image id -> short caption (the image's stand-in in the text)
    out: str = "runs/toy/llm"
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


def corpus(paths: list[str], tokenizer, max_docs: int, captions: str = "") -> list[str]:
    """Texts: the instruction records in the ``vicuna_v1`` format, each image replaced by its short caption (from
    the ``plain`` records with the same id) — so the LM learns to answer from a scene described in its context,
    as a real LLM reads a description. Records without a caption for their image keep only text-only turns."""
    by_id: dict[str, str] = {}
    if captions:
        for rec in json.loads(Path(captions).read_text()):
            conv = rec.get("conversations") or []
            if rec.get("id") is not None and len(conv) >= 2:
                by_id[str(rec["id"])] = conv[1]["value"]
    docs: list[str] = []
    for p in paths:
        for rec in json.loads(Path(p).read_text()):
            has_image = rec.get("image") is not None
            context = by_id.get(str(rec.get("id"))) if has_image else ""
            if has_image and not context:
                continue
            conv = [dict(t, value=t["value"].replace(IMAGE_PLACEHOLDER, context).strip()) for t in rec["conversations"]]
            try:
                turns = normalize_turns(conv, has_image=False)
            except BadRecord:
                continue
            docs.append(render("vicuna_v1", turns, tokenizer).text)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(docs), generator=g).tolist()
    return [docs[i] for i in order[: max_docs or None]]


def build_model(size: str, vocab: int, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    hidden, layers, heads, inter = SIZES[size]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, intermediate_size=inter, max_position_embeddings=2048,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def main(argv=None) -> int:
    cfg = parse_cli(ToyLLMConfig, argv, description=__doc__)
    for i, p in enumerate(cfg.data):
        if not Path(p).is_file():
            raise FileNotFoundError(f"data.{i}: {p} does not exist — run `make data`")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    from transformers import AutoTokenizer

    seed_all(cfg.seed)
    tok = AutoTokenizer.from_pretrained(cfg.tokenizer)
    docs = corpus(list(cfg.data), tok, cfg.max_docs, cfg.captions)
    ids = [t + [tok.eos_token_id] for t in tok(docs).input_ids]
    flat = torch.tensor([i for d in ids for i in d if i >= 0])
    n_blocks = len(flat) // cfg.block
    blocks = flat[: n_blocks * cfg.block].view(n_blocks, cfg.block)
    log.info("toy LLM corpus: %d documents, %d tokens, %d blocks of %d", len(docs), len(flat), n_blocks, cfg.block)
    model = build_model(cfg.size, len(tok), tok)
    log.info("toy LLM: %s, %.2fM parameters", cfg.size, sum(p.numel() for p in model.parameters()) / 1e6)
    opt = build_adamw(model, cfg.lr, weight_decay=cfg.weight_decay)
    sched = warmup_cosine(opt, cfg.warmup, cfg.steps, 0.1)
    out = Path(cfg.out)
    save_config(cfg, out / "toy_llm_config.yaml")
    metrics = MetricLogger(out)
    g = torch.Generator().manual_seed(cfg.seed)
    model.train()
    t0 = time.time()
    for step in progress(range(1, cfg.steps + 1), desc="toy LLM"):
        x = blocks[torch.randint(n_blocks, (cfg.batch_size,), generator=g)]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == cfg.steps:
            metrics.log(step, {"loss": loss.item(), "lr": sched.get_last_lr()[0], "seconds": time.time() - t0})
    log.info("toy LLM: final loss %.3f after %d steps (%.0f s)", loss.item(), cfg.steps, time.time() - t0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
