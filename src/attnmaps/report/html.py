"""``attnmaps report RUN``: one self-contained HTML page for a second-stage run.

The page holds the three mIoU columns (seeds on the training split from true labels, stage 1
on the validation split from predicted labels, stage 2 on it without labels), per-class IoU
bars, the loss and validation-mIoU curves from ``log.jsonl``, the confusion matrix (rows = truth,
each row normalized), a gallery of the best and worst validation images (image | truth |
prediction | each class's probability) and the resolved config. Pictures are inlined as
base64 PNG: the file needs no network and no other file.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from ..config import load_config
from ..data.registry import build_dataset
from ..viz import colorize

GALLERY_SIZE = 4
STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px}td,th{padding:3px 8px;border:1px solid #ddd}
th{background:#f4f4f4}.num{text-align:right;font-variant-numeric:tabular-nums}
.bar{background:#4a7fd4;height:12px;display:inline-block;vertical-align:middle}
.bar.s1{background:#d49a4a}.cm td{width:46px;text-align:center}
img.panel{width:100px;height:auto;image-rendering:pixelated;margin:1px}
.caption{font-size:11px;color:#555}pre{background:#f7f7f7;padding:8px;font-size:11px}
"""


def png_data_uri(image: np.ndarray | None = None, figure: plt.Figure | None = None) -> str:
    """``data:image/png;base64,...`` of a uint8 array or a matplotlib figure (closed after)."""
    buffer = io.BytesIO()
    if figure is not None:
        figure.savefig(buffer, format="png", dpi=100)
        plt.close(figure)
    else:
        Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _fmt(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.3f}"


def results_table(metrics: dict) -> str:
    """The paper's three columns, and the seeds' ignore band."""
    seeds, stage1, stage2 = metrics["seeds"], metrics["stage1_val"], metrics["stage2"]
    rows = [("seeds, training split, true image labels", seeds["miou_true_labels"]),
            ("stage 1 (class-token masks), validation, predicted labels", stage1["miou"]),
            ("stage 2 (segmentation network), validation, no labels", stage2["miou"])]
    if "raw_miou" in stage2:
        rows[-1] = (f"{rows[-1][0]}, {stage2['refine_iterations']} PAMR iterations",
                    stage2["miou"])
        rows.append(("stage 2 without the refinement", stage2["raw_miou"]))
    body = "".join(f"<tr><td>{html.escape(name)}</td><td class=num>{_fmt(v)}</td></tr>"
                   for name, v in rows)
    band = (f"<p class=caption>Ignore band: margin {seeds['ignore_margin']} around the background "
            f"threshold, {seeds['class_margin']} between two classes; "
            f"{100 * seeds['ignored_fraction']:.1f}% of the seed pixels ignored; seeds' mIoU on "
            f"their labelled pixels {_fmt(seeds['labelled']['miou'])}.</p>")
    return f"<table><tr><th>masks</th><th>mIoU</th></tr>{body}</table>{band}"


def iou_bars(names: Sequence[str], stage2: Sequence[float | None],
             stage1: Sequence[float | None]) -> str:
    """Per-class IoU as horizontal bars, stage 2 above stage 1."""
    rows = []
    for name, ours, first in zip(names, stage2, stage1):
        cells = "".join(
            f"<div><span class='bar {cls}' style='width:{300 * (v or 0):.0f}px'></span> "
            f"{_fmt(v)} <span class=caption>{label}</span></div>"
            for v, cls, label in ((ours, "", "stage 2"), (first, "s1", "stage 1")))
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{cells}</td></tr>")
    return f"<table>{''.join(rows)}</table>"


def curves(log_path: Path) -> str:
    """Training loss per logged step and validation mIoU per epoch, as one inlined figure."""
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()] \
        if log_path.is_file() else []
    steps = [(r["step"], r["loss"]) for r in records if "loss" in r]
    # the network's own (unrefined) mIoU: only the last epoch is also scored refined
    evals = [(r["epoch"] + 1, r["eval"].get("raw_miou", r["eval"]["miou"])) for r in records
             if "eval" in r]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3))
    if steps:
        left.plot(*zip(*steps))
    left.set(xlabel="step", ylabel="training loss", title="loss")
    if evals:
        right.plot(*zip(*evals), marker="o")
    right.set(xlabel="epoch", ylabel="mIoU", title="validation mIoU (no labels, unrefined)")
    figure.tight_layout()
    return f"<img alt='training curves' src='{png_data_uri(figure=figure)}'>"


def confusion_table(confusion: Sequence[Sequence[int]], names: Sequence[str]) -> str:
    """Confusion matrix, each row (ground truth) normalized to fractions, shaded by value."""
    matrix = np.asarray(confusion, dtype=np.float64)
    rows = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    body = "".join(
        f"<tr><th>{html.escape(name)}</th>" + "".join(
            f"<td style='background:rgba(74,127,212,{v:.2f})'>{100 * v:.0f}</td>" for v in row)
        + "</tr>" for name, row in zip(names, rows))
    return (f"<table class=cm><tr><th>truth \\ predicted (%)</th>{head}</tr>{body}</table>")


def heat(image: np.ndarray, score: np.ndarray) -> np.ndarray:
    """``image`` blended with ``score`` [H,W] in [0,1] in the jet colormap."""
    colors = (plt.get_cmap("jet")(score)[..., :3] * 255).astype(np.float32)
    return (0.45 * image.astype(np.float32) + 0.55 * colors).astype(np.uint8)


def gallery(run_dir: Path, per_image: dict[str, float], names: Sequence[str]) -> str:
    """The best and worst validation images by their own mIoU."""
    from ..segment.predictors import load_predictor

    cfg = load_config(run_dir / "config.yaml")
    dataset = build_dataset(cfg.data, cfg.data.val_split, train=False)
    predictor = load_predictor(run_dir, "cpu")
    index = {image_id: i for i, image_id in enumerate(dataset.ids)}
    ranked = sorted((v, k) for k, v in per_image.items() if v is not None and not math.isnan(v))
    sections = []
    for title, chosen in (("best", ranked[::-1][:GALLERY_SIZE]), ("worst", ranked[:GALLERY_SIZE])):
        rows = []
        for miou, image_id in chosen:
            i = index[image_id]
            sample = dataset[i]
            image = np.asarray(dataset.raw_image(i), dtype=np.uint8)
            masks, maps = predictor(sample["image"][None])
            panels = [(image, "image"), (colorize(sample["mask"].numpy()), "truth"),
                      (colorize(masks[0].cpu().numpy()), "prediction")]
            panels += [(heat(image, m), names[c + predictor.label_offset])
                       for c, m in enumerate(maps[0].cpu().numpy())]
            cells = "".join(f"<td><img class=panel src='{png_data_uri(p)}' alt='{html.escape(t)}'>"
                            f"<div class=caption>{html.escape(t)}</div></td>" for p, t in panels)
            rows.append(f"<tr><th>{html.escape(image_id)}<div class=caption>mIoU "
                        f"{miou:.3f}</div></th>{cells}</tr>")
        sections.append(f"<h3>{title} {len(chosen)}</h3><table>{''.join(rows)}</table>")
    return "".join(sections)


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write the HTML report of the second-stage run ``run_dir`` (default ``RUN/report.html``)."""
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path} not found; 'attnmaps report' reads a run "
                                "written by 'attnmaps segment'")
    metrics = json.loads(metrics_path.read_text())
    stage2 = metrics["stage2"]
    names = metrics.get("class_names") or [f"label_{i}" for i in range(len(stage2["confusion"]))]
    config_text = (run_dir / "config.yaml").read_text()
    page = f"""<!DOCTYPE html>
<html lang=en><head><meta charset=utf-8><title>attnmaps report: {html.escape(run_dir.name)}</title>
<style>{STYLE}</style></head><body>
<h1>attnmaps report: {html.escape(str(run_dir))}</h1>
<h2>Results</h2>{results_table(metrics)}
<h2>Per-class IoU (validation)</h2>{iou_bars(names, stage2["per_class_iou"],
                                              metrics["stage1_val"]["per_class_iou"])}
<h2>Training</h2>{curves(run_dir / "log.jsonl")}
<h2>Confusion matrix, stage 2 (validation)</h2>{confusion_table(stage2["confusion"], names)}
<h2>Gallery: best and worst validation images</h2>
{gallery(run_dir, stage2["per_image"], names)}
<h2>Config</h2><pre>{html.escape(config_text)}</pre>
</body></html>
"""
    out = out or run_dir / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return out
