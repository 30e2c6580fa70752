"""The pipeline's stages as the Makefile runs them: which ``make`` target writes which folder, from which config.

The Makefile passes every stage one config (``ENC_CFG``, ``RAE_CFG``, ...) and nothing after it; before a stage
runs, ``python -m ov3common.pipeline need TARGET CONFIG [overrides]`` looks at the paths the config names:

* a missing path that another stage writes (its config's ``out_dir``, or the toy world ``data/toy``) is a missing
  prerequisite. For a toy config (its file name contains ``toy``) that stage is built first (``make TARGET``, which
  does the same for its own inputs, so ``make rae-train`` on a fresh clone builds the whole toy chain); for a real
  config one line names the target (and, when a config in ``configs/`` writes that folder, the config) and the
  command stops (exit 2): real stages take GPU days and are started by hand.
* ``python -m ov3common.pipeline get CONFIG KEY`` prints one value of a config (``_base_`` resolved), so recipes
  can ask a config for its run folder instead of repeating it.

``get`` reads YAML only (no torch import): it answers in a fraction of a second. ``need`` also loads the config
with its program's schema (unknown keys, path fields), which imports that package (1–5 s with torch). The stages'
configs come from the environment (the Makefile exports its config variables), so ``make -n TARGET VAR=real.yaml``
prints only the config given.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from ov3common.config import ConfigError, _read_yaml, check_paths, import_object, load_config

__all__ = ["Stage", "STAGES", "read", "outputs", "missing_inputs", "main"]


@dataclass(frozen=True)
class Stage:
    target: str  # make target
    var: str  # Makefile variable holding its config
    default: str  # that variable's default
    output_keys: tuple[str, ...] = ("out_dir",)  # dotted keys of the folders/files it writes
    candidates: tuple[str, ...] = ()  # globs of the repo's configs for this stage (a producer the variable lacks)


# pipeline order: prerequisites are built in this order
STAGES: tuple[Stage, ...] = (
    Stage("data", "DATA", "data/toy", ()),
    Stage("toy-vae", "TOY_VAE_CFG", "configs/encoder/toy_vae.yaml"),
    Stage("pretrain-encoder", "ENC_CFG", "configs/encoder/toy.yaml", candidates=("configs/encoder/*.yaml",)),
    Stage("pretrain-encoder-baseline", "ENC_BASELINE_CFG", "configs/encoder/toy_baseline.yaml"),
    Stage("cache-latents", "ENC_CFG", "configs/encoder/toy.yaml", ("cache.out_dir",)),
    Stage("rae-decoder", "DEC_CFG", "configs/encoder/decoder_toy.yaml", candidates=("configs/encoder/decoder_*.yaml",)),
    Stage("toy-llm", "TOY_LLM_CFG", "configs/llava/toy_llm.yaml"),
    Stage("llava-stage1", "LLAVA_STAGE1", "configs/llava/toy_stage1.yaml", candidates=("configs/llava/*stage1*.yaml",)),
    Stage("llava-stage2", "LLAVA_STAGE2", "configs/llava/toy_stage2.yaml", candidates=("configs/llava/*stage2*.yaml",)),
    Stage("llava-lora", "LLAVA_LORA", "configs/llava/toy_lora.yaml", candidates=("configs/llava/*lora*.yaml",)),
    Stage("cache-rae-latents", "RAE_CACHE_CFG", "configs/rae/cache_toy.yaml", candidates=("configs/rae/cache_*.yaml",)),
    Stage("rae-train", "RAE_CFG", "configs/rae/toy.yaml",
          candidates=("configs/rae/toy*.yaml", "configs/rae/imagenet_*.yaml")),
    Stage("rae-sample", "RAE_SAMPLE_CFG", "configs/rae/sample_toy.yaml", ("out",), ("configs/rae/sample_*.yaml",)),
    Stage("fid-weights", "FID_WEIGHTS", "weights/inception_fid/inception-2015-12-05-fidhelper.pth", ()),
)
_BY_TARGET = {s.target: s for s in STAGES}
# the config schema of each target's program: a real config is loaded and its paths checked before the launch, so a
# bad key or a missing file is one line naming it (the program itself checks again)
SCHEMAS = {
    "pretrain-encoder": "encoder.train:Config", "pretrain-encoder-baseline": "encoder.train:Config",
    "cache-latents": "encoder.cache_latents:CacheConfig", "rae-decoder": "encoder.train_decoder:Config",
    "llava-stage1": "llava_bridge.config:LlavaTrainConfig", "llava-stage2": "llava_bridge.config:LlavaTrainConfig",
    "llava-lora": "llava_bridge.config:LlavaTrainConfig",
    "cache-rae-latents": "rae_generation.config:CacheConfig", "rae-train": "rae_generation.config:RAETrainConfig",
    "rae-sample": "rae_generation.config:SampleConfig", "eval-all": "eval.eval_config:EvalAllConfig",
}
# more checks of a target's inputs than its schema's path fields (named, so this module imports no package above it)
CHECKS = {t: "llava_bridge.config:check_inputs" for t in ("llava-stage1", "llava-stage2", "llava-lora")}


def is_toy(config: str) -> bool:
    """The naming convention: toy configs have ``toy`` in their file name; real ones do not."""
    return "toy" in Path(config).name


def read(config: str, overrides: list[str] = ()) -> dict:
    """The YAML (``_base_`` resolved) with dotted ``key=value`` overrides applied (list items by index)."""
    data = _read_yaml(Path(config))
    for o in overrides:
        if "=" not in o:
            continue
        key, text = o.split("=", 1)
        node, parts = data, key.split(".")
        for p in parts[:-1]:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        last = parts[-1]
        value = yaml.safe_load(text) if text else ""
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return data


def get(data: dict, key: str):
    node = data
    for p in key.split("."):
        if isinstance(node, list):
            node = node[int(p)]
        elif isinstance(node, dict) and p in node:
            node = node[p]
        else:
            return None
    return node


def leaves(data, prefix: str = ""):
    """(dotted key, string value) of every string in the config, list items included."""
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, str):
            yield key, v
        else:
            yield from leaves(v, key + ".")


def stage_config(stage: Stage, env: dict) -> str:
    return env.get(stage.var) or stage.default


def outputs(stage: Stage, env: dict, config: str | None = None) -> list[str]:
    """What ``stage`` writes with its current config (``config`` or the environment's/default one)."""
    if stage.target in ("data", "fid-weights"):
        return [stage_config(stage, env)]
    config = config or stage_config(stage, env)
    try:
        data = read(config)
    except ConfigError:
        return []
    outs = [get(data, k) for k in stage.output_keys]
    if stage.target == "rae-sample" and not outs[0] and get(data, "run"):
        outs = [str(Path(get(data, "run")) / "samples")]
    if stage.target == "cache-latents" and not outs[0] and get(data, "out_dir"):
        outs = [str(Path(get(data, "out_dir")) / "latents")]  # encoder.cache_latents' default
    return [o for o in outs if isinstance(o, str) and o]


def _under(path: str, root: str) -> bool:
    p, r = Path(os.path.normpath(path)), Path(os.path.normpath(root))
    return p == r or r in p.parents


def producer(path: str, env: dict) -> tuple[Stage, str] | None:
    """(stage, config) that writes ``path``: the stage whose output is the most specific folder holding it, with
    the config of its Makefile variable; else a config of the repo for that stage (``Stage.candidates``)."""
    for configs in (lambda s: [stage_config(s, env)], _candidates):
        best = None
        for stage in STAGES:
            for config in configs(stage):
                for out in outputs(stage, env, config):
                    if _under(path, out) and (best is None or len(out) > len(best[2])):
                        best = (stage, config, out)
        if best is not None:
            return best[0], best[1]
    return None


def _candidates(stage: Stage) -> list[str]:
    return sorted({str(p) for g in stage.candidates for p in Path().glob(g)})


OUTPUT_KEYS = ("out_dir", "export_dir", "cache.out_dir", "out")  # what a config writes, never an input


def missing_inputs(target: str, config: str, overrides: list[str], env: dict,
                   ignore: tuple[str, ...] = ()) -> list[tuple[str, str, Stage, str]]:
    """(key, path, producing stage, its config) of every missing path of ``config`` that another stage writes; keys under an
    ``ignore`` prefix are left out (eval-all scores whichever runs exist)."""
    data = read(config, overrides)
    found = []
    for key, value in leaves(data):
        if key in OUTPUT_KEYS or any(key == i or key.startswith(i + ".") for i in ignore):
            continue
        if not value or "/" not in value or "{" in value or "*" in value or Path(value).exists():
            continue
        hit = producer(value, env)
        if hit is not None and hit[0].target != target:
            found.append((key, value, *hit))
    return found


def need(target: str, config: str, overrides: list[str], env: dict | None = None,
         ignore: tuple[str, ...] = ()) -> int:
    env = dict(os.environ if env is None else env)
    if not Path(config).is_file():
        print(f"{target}: config file does not exist: {config}", file=sys.stderr)
        return 2
    try:
        missing = missing_inputs(target, config, overrides, env, ignore)
    except ConfigError as e:
        print(f"{target}: {e}", file=sys.stderr)
        return 2
    if not missing:
        return 0 if is_toy(config) else check_config(target, config, overrides)
    if not is_toy(config):
        for key, path, stage, cfg in missing:
            how = f"make {stage.target}" + (f" {stage.var}={cfg}" if stage.target not in ("data", "fid-weights") else "")
            print(f"{target}: {key}: {path} does not exist; `{how}` writes it", file=sys.stderr)
        return 2
    if int(env.get("MAKELEVEL", "0")) > 12:
        print(f"{target}: prerequisites nest too deep (a cycle in the toy configs?)", file=sys.stderr)
        return 2
    make = env.get("OV3_MAKE", "make")
    done = set()
    for _, _, stage, cfg in sorted(missing, key=lambda m: STAGES.index(m[2])):
        if (stage.target, cfg) in done:
            continue
        done.add((stage.target, cfg))
        paths = ", ".join(p for _, p, s, c in missing if (s.target, c) == (stage.target, cfg))
        assign = [] if stage.target in ("data", "fid-weights") else [f"{stage.var}={cfg}"]
        print(f"{target}: make {stage.target} {' '.join(assign)} first (missing: {paths})", file=sys.stderr)
        rc = subprocess.call([*make.split(), "--no-print-directory", stage.target, *assign, "ARGS="], env=env)
        if rc:
            return rc
    return 0


def check_config(target: str, config: str, overrides: list[str]) -> int:
    """Load ``config`` with its program's schema and check its paths; one line naming the key on failure."""

    if target not in SCHEMAS:
        return 0
    try:
        cfg = load_config(import_object(SCHEMAS[target], target), config, overrides)
        check_paths(cfg)
        if target in CHECKS:
            import_object(CHECKS[target], target)(cfg)
    except (ConfigError, FileNotFoundError) as e:
        print(f"{target}: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) >= 3 and args[0] == "need":
        rest, ignore = args[3:], []
        while len(rest) >= 2 and rest[0] == "--ignore":
            ignore.append(rest[1])
            rest = rest[2:]
        return need(args[1], args[2], rest, ignore=tuple(ignore))
    if len(args) == 3 and args[0] == "get":
        try:
            value = get(read(args[1]), args[2])
        except ConfigError as e:
            print(e, file=sys.stderr)
            return 2
        if value is None:
            print(f"{args[1]}: key '{args[2]}' is not set", file=sys.stderr)
            return 2
        print(value)
        return 0
    print(__doc__, file=sys.stderr)
    print("usage: python -m ov3common.pipeline need TARGET CONFIG [key=value ...] | get CONFIG KEY", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
