"""The evaluation protocol recorded with every figure: how a metrics file was made.

:func:`build_protocol` collects, from a run's config, the scored split and the checkpoint: the
split and its image count, where the image labels came from, the merge rule, the class maps
(attention or fused), test-time augmentation, the refinement (PAMR iterations, CRF and its
parameters), the background threshold and how it was chosen, precision, the global batch size
(constant for any process count: under ``torchrun`` each of N processes takes
``batch_size / N``), seed, code version and checkpoint id.
:func:`format_protocol` prints it as the text block the commands show.

Example:
    >>> block = build_protocol(Config(), split="val", num_images=300)
    >>> block["labels"], block["background_threshold"]["chosen_by"]
    ('predicted', 'fixed in the config (pseudo.threshold)')
    >>> print(format_protocol({"split": "val", "seed": 0}))
    protocol:
      split  val
      seed   0
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from importlib import metadata
from pathlib import Path

from .checkpoint import read_metadata
from .config import Config, PseudoMaskConfig

FIXED = "fixed in the config (pseudo.threshold)"
USES_PIXEL_LABELS = "uses pixel labels"


def code_version() -> str:
    """``git describe --always --dirty`` of the checkout holding this package, else the
    installed package version."""
    try:
        described = subprocess.run(["git", "describe", "--always", "--dirty"],
                                   cwd=Path(__file__).parent, capture_output=True, text=True,
                                   timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        described = ""
    return f"git {described}" if described else f"attnmaps {metadata.version('attnmaps')}"


def checkpoint_id(weights: str | Path | None) -> str | None:
    """The ``checkpoint_id`` in a weights file's metadata (None without a file or an id)."""
    if weights is None or not Path(weights).is_file():
        return None
    return read_metadata(weights).get("checkpoint_id")


def refinement(settings: PseudoMaskConfig) -> dict:
    """The post-processing of ``settings``: PAMR iterations and the CRF (None when off)."""
    crf = None
    if settings.crf:
        crf = {field.name.removeprefix("crf_"): getattr(settings, field.name)
               for field in dataclasses.fields(settings) if field.name.startswith("crf_")}
    return {"pamr_iterations": settings.refine_iterations, "crf": crf}


def build_protocol(cfg: Config, *, split: str, num_images: int, weights: str | Path | None = None,
                   threshold_choice: str = FIXED, threshold: float | None = None) -> dict:
    """The protocol block of a score of ``cfg``'s pseudo masks on ``split`` (see the module doc).

    ``threshold_choice`` says how the background threshold (``threshold``, default
    ``cfg.pseudo.threshold``) was chosen; a choice that used pixel labels must say
    :data:`USES_PIXEL_LABELS`.
    """
    pseudo = cfg.pseudo
    return {
        "split": split,
        "num_images": num_images,
        "dataset": cfg.data.name,
        "labels": "true image labels" if pseudo.use_true_labels else "predicted",
        "prob_threshold": pseudo.prob_threshold,
        "merge": pseudo.merge,
        "maps": pseudo.maps,
        "tta": {"scales": list(pseudo.tta_scales), "flip": pseudo.tta_flip},
        "refinement": refinement(pseudo),
        "background_threshold": {
            "value": pseudo.threshold if threshold is None else threshold,
            "chosen_by": threshold_choice},
        "attn_blocks": cfg.model.attn_blocks,
        "precision": cfg.train.precision,
        "global_batch_size": cfg.train.batch_size,
        "batch_size_note": "global: split across processes, the same for any process count",
        "seed": cfg.train.seed,
        "code_version": code_version(),
        "checkpoint_id": checkpoint_id(weights),
    }


def directory_protocol(pred_dir: Path, gt_dir: Path, num_images: int) -> dict:
    """The protocol of masks in ``pred_dir`` scored against ``gt_dir`` (``attnmaps evaluate``):
    the block that ``attnmaps pseudo-masks`` recorded in ``pred_dir/metrics.json`` when it wrote
    them, else a note that it is unknown; plus what was scored here."""
    block = None
    written = Path(pred_dir) / "metrics.json"
    if written.is_file():
        try:
            block = json.loads(written.read_text()).get("protocol")
        except (json.JSONDecodeError, AttributeError):
            block = None
    if not isinstance(block, dict):
        block = {"masks": "not written by attnmaps pseudo-masks: how they were made is unknown"}
    scored = {"pred": str(pred_dir), "gt": str(gt_dir), "num_images": num_images,
              "code_version": code_version()}
    return {**block, "scored_by_attnmaps_evaluate": scored}


def format_protocol(block: dict) -> str:
    """The protocol block as aligned ``key  value`` lines (nested keys joined by dots)."""
    rows = list(_flatten(block))
    width = max(len(key) for key, _ in rows)
    return "\n".join(["protocol:", *(f"  {key:<{width}}  {value}" for key, value in rows)])


def _flatten(block: dict, prefix: str = ""):
    for key, value in block.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
