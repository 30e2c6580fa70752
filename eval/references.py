"""The real sets every eval-all row shares, and their Inception features computed ahead of the rows.

``make eval-all ARGS="references_only=true"`` fills ``fid.cache_dir`` with the features of the gFID reference
(``gfid.real``) and of the rFID originals (the first ``rfid.max_images`` of ``rfid.images``, resized to each row's
encoder size) and stops. The features are cached by content (a file listing; the bytes of the resized originals), so
the row evaluations find them under the keys they look up and run Inception only on their own samples and
reconstructions. ``make demo`` runs it as soon as the encoders exist.
"""

from __future__ import annotations

from pathlib import Path

from encoder.export import read_export_config
from eval import gfid
from eval.fid import load_stats
from eval.inception import require_weights
from eval.rfid import original_images, select_images
from ov3common.config import ConfigError
from ov3common.log import get_logger

log = get_logger("eval.references")


def gfid_real(g) -> tuple[list[str] | None, str | list[Path]]:
    """(class names, the real set) of a ``GfidConfig``: a class-split folder gives its first ``real_per_class``
    images of each class; anything else (a folder, an npz) is the real set as it is."""
    if Path(g.real).is_dir() and all(p.is_dir() for p in Path(g.real).iterdir()):
        return [d.name for d in gfid.class_folders(g.real)], gfid.class_real_images(g.real, g.real_per_class)
    return None, g.real


def warm_references(cfg, device: str) -> None:
    """Fill ``fid.cache_dir`` with the Inception features of the real sets of an ``EvalAllConfig``'s pieces. Rows
    without an encoder export are skipped (their rFID piece reports the missing export itself)."""
    if not cfg.fid.cache_dir:
        raise ConfigError("references_only: fid.cache_dir is empty (the features would be computed and dropped)")
    require_weights(cfg.fid.weights)
    kw = dict(cache_dir=cfg.fid.cache_dir, batch_size=cfg.fid.batch_size, device=device, fused=cfg.fid.fused,
              precision=cfg.fid.precision)
    if "gfid" in cfg.pieces:
        st = load_stats(gfid_real(cfg.gfid)[1], cfg.fid.weights, **kw)
        log.info("gfid reference %s: %d images cached", cfg.gfid.real, st.n)
    if "rfid" in cfg.pieces:
        paths = select_images(cfg.rfid.images, cfg.rfid.max_images)
        sizes = {int(read_export_config(r.encoder)["image_size"]) for r in cfg.rows
                 if r.encoder and (Path(r.encoder) / "config.json").is_file()}
        for size in sorted(sizes):
            st = load_stats(original_images(paths, size, cfg.rfid.batch_size), cfg.fid.weights, **kw)
            log.info("rfid originals %s at %d px: %d images cached", cfg.rfid.images, size, st.n)
