"""Run under torchrun by tests/test_llava_distributed.py: ``llava_zero_worker.py MEM_DIR [train args ...]``.

Trains a LLaVA config as ``llava_bridge.train`` does (``build``, ``train``, ``save_model``) and, on rank 0, writes
every trainable tensor as it is in memory (gathered from the ZeRO-3 partitions) to MEM_DIR: before training
(``init``), at the first checkpoint step (``step<N>``, N = train.ckpt_every) and after the final save (``final``).
The test compares those with what was saved and loads back.
"""
import contextlib
import sys
from pathlib import Path

from safetensors.torch import save_file
from transformers import TrainerCallback

from llava_bridge.config import LlavaTrainConfig
from llava_bridge.train import build
from ov3common.config import parse_cli
from ov3common.dist import barrier, cleanup


def snapshot(model) -> dict:
    """The trainable tensors, full (a collective under ZeRO-3: every rank calls it)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    partitioned = [p for _, p in params if hasattr(p, "ds_id")]
    ctx = contextlib.nullcontext()
    if partitioned:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(partitioned)
    with ctx:
        return {n: p.detach().cpu().clone().contiguous() for n, p in params}


def main() -> None:
    mem = Path(sys.argv[1])
    cfg = parse_cli(LlavaTrainConfig, sys.argv[2:])
    trainer, _ = build(cfg)
    rank0 = trainer.args.process_index == 0

    def dump(name: str) -> None:
        snap = snapshot(trainer.model)
        if rank0:
            mem.mkdir(parents=True, exist_ok=True)
            save_file(snap, str(mem / f"{name}.safetensors"))

    class AtCheckpoint(TrainerCallback):  # on_step_end runs before the Trainer saves that step's checkpoint
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == cfg.train.ckpt_every:
                dump(f"step{state.global_step}")

    dump("init")
    trainer.add_callback(AtCheckpoint())
    trainer.train()
    trainer.save_model(cfg.out_dir)
    dump("final")
    barrier()


if __name__ == "__main__":
    try:
        main()
    finally:
        cleanup()
