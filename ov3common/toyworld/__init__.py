"""The embedded toy world: a deterministic, seeded generator of shape scenes and every format built from them.

``python -m ov3common.toyworld --out data/toy`` (``make data``) writes it; ``load_meta(root)`` reads its meta.
"""

from .generate import SPLITS, ToyConfig, generate, load_meta, load_scenes
from .render import render_scene
from .world import CLASSES, GENERATOR_VERSION, OBJECTS, sample_scene, scene_rng, split_seed

__all__ = ["CLASSES", "GENERATOR_VERSION", "OBJECTS", "SPLITS", "ToyConfig", "generate", "load_meta", "load_scenes",
           "render_scene", "sample_scene", "scene_rng", "split_seed"]
