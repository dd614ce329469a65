"""Raw and post-processed pseudo masks side by side: raw -> +PAMR -> +TTA -> +CRF.

:func:`cumulative_settings` turns one set of ``pseudo.*`` settings into its stages: the plain
masks (no refinement, one scale, no flip, no CRF), then each post-processing step the settings
enable, added in that order; :func:`evaluate_stages` scores each stage with the one evaluation
path (:func:`~attnmaps.engine.evaluate.evaluate`), so a raw figure and a post-processed one are
never compared by mistake.

Example:
    >>> [name for name, _ in cumulative_settings(PseudoMaskConfig(refine_iterations=10,
    ...                                                            crf=True))]
    ['raw', '+PAMR', '+CRF']
"""

from __future__ import annotations

from dataclasses import replace

from torch.utils.data import Dataset

from ..config import PseudoMaskConfig
from ..models.vit import ClassTokenViT
from .evaluate import evaluate


def cumulative_settings(settings: PseudoMaskConfig) -> list[tuple[str, PseudoMaskConfig]]:
    """``[(stage name, settings)]``: raw, then +PAMR, +TTA, +CRF as ``settings`` enable them;
    the last stage's settings equal ``settings``."""
    current = replace(settings, refine_iterations=0, tta_scales=[1.0], tta_flip=False, crf=False)
    stages = [("raw", current)]
    steps = (("+PAMR", settings.refine_iterations > 0,
              {"refine_iterations": settings.refine_iterations}),
             ("+TTA", list(settings.tta_scales) != [1.0] or settings.tta_flip,
              {"tta_scales": list(settings.tta_scales), "tta_flip": settings.tta_flip}),
             ("+CRF", settings.crf, {"crf": True}))
    for name, enabled, change in steps:
        if enabled:
            current = replace(current, **change)
            stages.append((name, current))
    return stages


def evaluate_stages(model: ClassTokenViT, dataset: Dataset, settings: PseudoMaskConfig, *,
                    final: dict | None = None, **options) -> list[dict]:
    """One row per stage of :func:`cumulative_settings`: ``stage``, ``miou`` (masks from
    predicted labels), ``miou_true_labels``, ``pixel_acc``.

    ``final`` = the metrics of ``settings`` themselves when already computed (saves the last
    pass); ``options`` go to :func:`~attnmaps.engine.evaluate.evaluate`.
    """
    stages = cumulative_settings(settings)
    rows = []
    for index, (name, stage) in enumerate(stages):
        last = index == len(stages) - 1
        metrics = final if last and final is not None else evaluate(model, dataset, stage,
                                                                    **options)
        rows.append({"stage": name, "miou": metrics["miou"],
                     "miou_true_labels": metrics["miou_true_labels"],
                     "pixel_acc": metrics["pixel_acc"]})
    return rows


def format_stages(rows: list[dict]) -> str:
    """The stage rows as a text table (mIoU in %)."""
    lines = [f"{'stage':<7}  {'mIoU (pred.)':>12}  {'mIoU (true)':>11}  {'pixel acc':>9}"]
    lines += [f"{row['stage']:<7}  {100 * row['miou']:>12.2f}  "
              f"{100 * row['miou_true_labels']:>11.2f}  {100 * row['pixel_acc']:>9.2f}"
              for row in rows]
    return "\n".join(lines)
