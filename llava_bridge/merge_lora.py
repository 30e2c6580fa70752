"""Merge a LoRA output folder into a plain stage-2 folder (LM with the adapter folded in + projector).

    python -m llava_bridge.merge_lora --model runs/toy/llava/lora --out runs/toy/llava/lora-merged
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llava_bridge.model import load_llava


def merge(model_dir: str, out_dir: str) -> Path:
    """Load ``model_dir`` (LoRA) with the adapter merged and ``save_pretrained`` it with its tokenizer."""
    model, tok = load_llava(model_dir, merge_lora=True)
    out = Path(out_dir)
    model.config.llm_path = None  # the merged folder is self-contained
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="LoRA output folder (adapter_config.json inside)")
    ap.add_argument("--out", required=True, help="where to write the merged folder")
    a = ap.parse_args(argv)
    if not (Path(a.model) / "adapter_config.json").is_file():
        ap.error(f"{a.model} has no adapter_config.json: not a LoRA folder")
    print(merge(a.model, a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
