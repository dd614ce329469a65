"""Dense-CRF speed and agreement: attnmaps' torch CRF (``pseudo.crf_backend=torch``, one call for
the batch) against ``pydensecrf2`` (``pseudo.crf_backend=pydensecrf``, image by image), with
the same parameters (PSA's defaults, 10 mean-field steps).

Speed: a batch of synthetic scenes at the VOC preset's image size (224 x 224; a few color
regions with texture noise, noisy unaries over background + 2 classes, as a pseudo mask of a
VOC image has): seconds per image of each (median over interleaved rounds) and the median of
the per-round ratios, plus how many pixels get the same label. The torch CRF runs twice: with
the appearance kernel's lattice on 2 x 2 pixel blocks (``--downsample``, default the
``pseudo.crf_bilateral_downsample`` default) and on every pixel (``torch exact``, as
``pydensecrf``). ``pydensecrf`` is one C++ thread; the torch CRF is timed at ``--threads``
(default 1, the like-for-like comparison).

Agreement on real pseudo masks: with ``--run DIR`` (e.g. the demo's ``DIR/run``) the run's
validation split is evaluated twice with ``pseudo.crf=true``, once per backend (the torch one
with ``--downsample``), through the one evaluation path; reported: the fraction of pixels whose
CRF-refined mask labels agree, and the mIoU of each.

    python benchmarks/crf_speed.py                          # 8 images, 224 x 224
    python benchmarks/crf_speed.py --run attnmaps_demo/run  # + agreement on the demo set
    python benchmarks/crf_speed.py --quick                  # 2 images, 64 x 64, 5 steps
"""

from __future__ import annotations

import argparse
import importlib.util
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from _measure import (
    add_threads_arg,
    apply_threads,
    environment,
    interleaved_times,
    median,
    paired_ratio,
    print_table,
    write_json,
)
from torch import Tensor

from attnmaps.pseudo.crf import crf_refine
from attnmaps.pseudo.crf_torch import CRFParams, dense_crf

HAS_PYDENSECRF = importlib.util.find_spec("pydensecrf") is not None


def scenes(batch: int, size: int, labels: int, seed: int) -> tuple[Tensor, Tensor]:
    """Colors [B,S,S,3] (0..255, uint8 values) of ``labels`` random rectangles of random colors
    on a random background with noise, and noisy probabilities [B,L,S,S] favouring the truth."""
    gen = torch.Generator().manual_seed(seed)
    truth = torch.zeros(batch, size, size, dtype=torch.long)
    palette = torch.rand(batch, labels, 3, generator=gen) * 255
    for b in range(batch):
        for label in range(1, labels):
            y0, x0 = (torch.rand(2, generator=gen) * size * 0.6).long().tolist()
            h, w = (size * (0.2 + 0.3 * torch.rand(2, generator=gen))).long().tolist()
            truth[b, y0:y0 + h, x0:x0 + w] = label
    colors = palette.gather(1, truth.flatten(1)[..., None].expand(-1, -1, 3)).view(
        batch, size, size, 3)
    colors = (colors + 20 * torch.randn(colors.shape, generator=gen)).clamp(0, 255).round()
    probs = torch.nn.functional.one_hot(truth, labels).permute(0, 3, 1, 2).float() * 0.4 + 0.3
    probs = (probs + 0.3 * torch.randn(probs.shape, generator=gen)).clamp(0.01, 1.0)
    return colors, probs / probs.sum(1, keepdim=True)


def pydensecrf_labels(colors: Tensor, probs: Tensor, params: CRFParams) -> np.ndarray:
    return np.stack([crf_refine(c.numpy().astype(np.uint8), p.double().numpy(), params)
                     for c, p in zip(colors, probs)])


def demo_agreement(run: Path, limit: int | None, downsample: int) -> dict:
    """Both backends through ``evaluate`` on the run's validation split (see the module doc)."""
    from torch.utils.data import Subset

    from attnmaps.data.registry import build_dataset
    from attnmaps.engine.evaluate import eval_options, evaluate
    from attnmaps.pipeline import load_run

    cfg, model = load_run(run)
    dataset = build_dataset(cfg.data, cfg.data.val_split, train=False)
    if limit:
        dataset = Subset(dataset, range(min(limit, len(dataset))))
    masks, scores = {}, {}
    for backend in ("torch", "pydensecrf"):
        kept: list[Tensor] = []
        settings = replace(cfg.pseudo, crf=True, crf_backend=backend,
                           crf_bilateral_downsample=downsample)
        metrics = evaluate(model, dataset, settings, **eval_options(cfg),
                           on_batch=lambda batch, probs, maps, pred, kept=kept: kept.append(
                               pred.cpu()))
        masks[backend], scores[backend] = torch.cat(kept), metrics["miou"]
    return {"run": str(run), "images": len(dataset), "bilateral_downsample": downsample,
            "pixels_agree": (masks["torch"] == masks["pydensecrf"]).double().mean().item(),
            "miou_torch": scores["torch"], "miou_pydensecrf": scores["pydensecrf"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224, help="the VOC preset's size")
    parser.add_argument("--labels", type=int, default=3, help="background + classes per image")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="the torch CRF's device")
    parser.add_argument("--downsample", type=int, default=CRFParams.bilateral_downsample,
                        help="the torch CRF's pseudo.crf_bilateral_downsample")
    parser.add_argument("--run", type=Path, default=None,
                        help="also measure agreement on this run's validation pseudo masks")
    parser.add_argument("--limit", type=int, default=None, help="first N images of --run")
    add_threads_arg(parser)
    parser.add_argument("--quick", action="store_true", help="2 images at 64 x 64, 5 steps")
    parser.add_argument("--out", type=Path, default=Path("docs/bench/crf_speed.json"))
    args = parser.parse_args()
    if args.threads is None:
        args.threads = 1
    if args.quick:
        args.images, args.image_size, args.iterations, args.repeats = 2, 64, 5, 2
    apply_threads(args)
    device = torch.device(args.device)
    params = CRFParams(iterations=args.iterations, bilateral_downsample=args.downsample)
    colors, probs = scenes(args.images, args.image_size, args.labels, args.seed)
    on_device = (colors.to(device), probs.to(device))
    fns = {name: lambda crf_params=crf_params: dense_crf(*on_device, crf_params).argmax(1)
           for name, crf_params in (("torch", params),
                                    ("torch exact", replace(params, bilateral_downsample=1)))}
    torch_names = list(fns)
    if HAS_PYDENSECRF:
        fns["pydensecrf"] = lambda: pydensecrf_labels(colors, probs, params)
    times = interleaved_times(fns, args.repeats, args.warmup, device)
    per_image = {name: median(t) / args.images for name, t in times.items()}
    result = {"config": {**vars(args), "out": str(args.out), "run": str(args.run)},
              "environment": environment(device), "params": vars(params),
              "seconds_per_image": per_image, "round_seconds": times}
    rows = [[name, per_image[name]] for name in fns]
    if HAS_PYDENSECRF:
        want = fns["pydensecrf"]()
        for name in torch_names:
            suffix = name.removeprefix("torch").replace(" ", "_")
            ratio = paired_ratio(times["pydensecrf"], times[name])
            agree = float((fns[name]().cpu().numpy() == want).mean())
            result[f"pydensecrf_over_torch{suffix}_time"] = ratio
            result[f"synthetic_pixels_agree{suffix}"] = agree
            rows += [[f"pydensecrf / {name} time", ratio], [f"pixels agree, {name}", agree]]
    else:
        result["pydensecrf"] = "not installed (pip install 'attnmaps[crf]')"
    print_table(["", "value"], rows)
    if args.run is not None:
        result["demo_agreement"] = demo_agreement(args.run, args.limit, args.downsample)
        print(result["demo_agreement"])
    write_json(args.out, result)


if __name__ == "__main__":
    main()
