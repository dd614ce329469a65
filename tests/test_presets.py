"""The dataset presets shipped in ``attnmaps/configs``: the paper's settings, and one short
training epoch from each CPU-sized variant on tiny data written in that preset's format."""

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from attnmaps.cli import main
from attnmaps.config import load_config
from attnmaps.data.base import IMAGENET_MEAN, IMAGENET_STD
from attnmaps.data.geotiff import DFC2020_CLASSES, DFC2020_LABEL_MAP
from attnmaps.data.image_io import write_image, write_mask

PRESETS = ("voc", "coco", "ade20k", "dfc2020", "endotect")
# Supplementary Table 7 / Sec. 8 of the paper; VOC and COCO input sizes are not given there.
PAPER = {
    "voc": {"patch": 16, "chans": 3, "size": None},
    "coco": {"patch": 16, "chans": 3, "size": None},
    "ade20k": {"patch": 16, "chans": 3, "size": (200, 320)},
    "dfc2020": {"patch": 14, "chans": 15, "size": (224, 224)},
    "endotect": {"patch": 16, "chans": 3, "size": (512, 640)},
}
FORMATS = {"voc": ("voc", True), "coco": ("coco", True), "ade20k": ("ade20k", True),
           "dfc2020": ("geotiff", False), "endotect": ("folder", True)}
RAW = (20, 24)  # stored size of the generated images; training resizes them to TINY
TINY = ["model.img_size=16,16", "data.image_size=16,16", "train.epochs=1",
        "train.batch_size=2", "train.warmup_epochs=0.5", "data.num_workers=0"]


def preset(name: str) -> Path:
    return Path(str(resources.files("attnmaps") / "configs" / f"{name}.yaml"))


def _rgb(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*RAW, 3), dtype=np.uint8)


def _blocks(values: tuple[int, int]) -> np.ndarray:
    """Mask with the left half ``values[0]`` and the right half ``values[1]``."""
    mask = np.full(RAW, values[0], np.uint8)
    mask[:, RAW[1] // 2:] = values[1]
    return mask


def _write_voc(root: Path) -> int:
    splits = {"train": ["t0", "t1", "t2", "t3"], "val": ["v0", "v1"]}
    for split, ids in splits.items():
        for k, image_id in enumerate(ids):
            write_image(root / "JPEGImages" / f"{image_id}.jpg", _rgb(k))
            write_mask(root / "SegmentationClass" / f"{image_id}.png", _blocks((0, 1 + 5 * k)))
        (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids))
    return 20


def _write_coco(root: Path) -> int:
    categories = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}]
    height, width = RAW
    for split, count in (("train2014", 4), ("val2014", 2)):
        images, annotations = [], []
        for k in range(count):
            write_image(root / split / f"{k}.jpg", _rgb(k))
            images.append({"id": k, "file_name": f"{k}.jpg", "height": height, "width": width})
            box = [2.0, 2.0, 12.0, 2.0, 12.0, 14.0, 2.0, 14.0]
            annotations.append({"id": k, "image_id": k, "category_id": categories[k % 3]["id"],
                                "segmentation": [box], "iscrowd": 0})
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(
            {"images": images, "annotations": annotations, "categories": categories}))
    return 3


def _write_ade20k(root: Path) -> int:
    for split, count in (("training", 4), ("validation", 2)):
        (root / "annotations" / split).mkdir(parents=True)
        for k in range(count):
            write_image(root / "images" / split / f"ADE_{k}.jpg", _rgb(k))
            Image.fromarray(_blocks((0, 1 + 37 * k))).save(
                root / "annotations" / split / f"ADE_{k}.png")
    return 150


def _write_dfc2020(root: Path) -> int:
    tifffile = pytest.importorskip("tifffile")
    rng = np.random.default_rng(0)
    for sub in ("images", "masks", "splits"):
        (root / sub).mkdir(parents=True)
    splits = {"train": ["s0", "s1", "s2", "s3"], "val": ["s4", "s5"]}
    for k, scene in enumerate(splits["train"] + splits["val"]):
        s2 = rng.integers(0, 5000, (13, *RAW)).astype(np.float32)  # reflectance x 10,000
        s1 = rng.uniform(-25.0, 0.0, (2, *RAW)).astype(np.float32)  # dB
        tifffile.imwrite(root / "images" / f"{scene}.tif", np.concatenate([s2, s1]),
                         planarconfig="separate", photometric="minisblack")
        tifffile.imwrite(root / "masks" / f"{scene}.tif", _blocks((1, 2 + k)))  # DFC values
    for split, ids in splits.items():
        (root / "splits" / f"{split}.txt").write_text("\n".join(ids))
    (root / "classes.txt").write_text("\n".join(DFC2020_CLASSES))
    return 8


def _write_endotect(root: Path) -> int:
    classes = ("polyps", "cecum", "ileum")
    for split, count in (("train", 2), ("val", 1)):
        for c, name in enumerate(classes):
            for k in range(count):
                write_image(root / split / name / f"{k}.jpg", _rgb(10 * c + k))
    return len(classes)


WRITERS = {"voc": _write_voc, "coco": _write_coco, "ade20k": _write_ade20k,
           "dfc2020": _write_dfc2020, "endotect": _write_endotect}


def test_every_shipped_yaml_is_covered():
    shipped = {p.stem for p in preset("demo").parent.glob("*.yaml")}
    assert shipped == {"demo", "digits", *PRESETS, *(f"{name}_cpu" for name in PRESETS)}


@pytest.mark.parametrize("name", [*PRESETS, *(f"{p}_cpu" for p in PRESETS)])
def test_preset_loads_and_is_consistent(name):
    cfg = load_config(preset(name))
    model, data = cfg.model, cfg.data
    assert [s % model.patch_size for s in model.img_size] == [0, 0]
    assert data.image_size == model.img_size and data.root is None
    assert len(data.mean) == len(data.std) == model.in_chans
    assert (data.name, data.has_background) == FORMATS[name.removesuffix("_cpu")]
    assert cfg.train.betas == [0.9, 0.95] and cfg.train.gate_lambda == 0.01
    assert model.mask_rate == 0.5 and model.gates and model.num_registers == 1
    assert model.head == "joint" and cfg.pseudo.refine_iterations == 0


@pytest.mark.parametrize("name", PRESETS)
def test_cpu_variant_keeps_the_data_settings(name):
    full, cpu = load_config(preset(name)), load_config(preset(f"{name}_cpu"))
    differ = {"image_size", "num_workers"} | ({"train_split", "val_split"} if name == "voc"
                                               else set())
    for key, value in vars(full.data).items():
        if key not in differ:
            assert getattr(cpu.data, key) == value, key
    assert cpu.model.in_chans == full.model.in_chans
    assert cpu.model.depth < full.model.depth and cpu.model.embed_dim < full.model.embed_dim


# Supplementary Sec. 8, for every dataset: AdamW betas, 200 epochs, depth 12, 16 heads,
# lambda = 0.01, 50 % [CLS] masking; main paper: one [REG] token, gates, ViT-B width 768.
PAPER_COMMON = {"model.depth": 12, "model.num_heads": 16, "model.embed_dim": 768,
                "model.num_registers": 1, "model.gates": True, "model.mask_rate": 0.5,
                "train.gate_lambda": 0.01, "train.betas": [0.9, 0.95], "train.epochs": 200}


def paper_mismatches(cfg, name: str) -> list[str]:
    """``key: ours != paper`` for every setting the paper gives that ``cfg`` does not follow."""
    paper = {**PAPER_COMMON, "model.patch_size": PAPER[name]["patch"],
             "model.in_chans": PAPER[name]["chans"]}
    found = []
    for key, value in paper.items():
        section, field = key.split(".")
        ours = getattr(getattr(cfg, section), field)
        if ours != value:
            found.append(f"{key}: {ours!r} != paper {value!r}")
    return found


@pytest.mark.parametrize("name", PRESETS)
def test_paper_settings(name):
    cfg = load_config(preset(name))
    model, paper = cfg.model, PAPER[name]
    assert paper_mismatches(cfg, name) == []
    assert model.stem == "linear" and model.mlp_ratio == 4.0
    assert cfg.train.warmup_epochs > 0 and cfg.train.min_lr < cfg.train.lr  # cosine + warm-up
    if paper["size"] is not None:
        for ours, theirs in zip(model.img_size, paper["size"]):
            multiples = np.arange(1, 100) * paper["patch"]
            nearest = multiples[np.abs(multiples - theirs) == np.abs(multiples - theirs).min()]
            assert ours == theirs if theirs % paper["patch"] == 0 else ours in nearest
    if paper["chans"] == 3:
        assert tuple(cfg.data.mean) == IMAGENET_MEAN and tuple(cfg.data.std) == IMAGENET_STD


@pytest.mark.parametrize("drift", ["model.depth=11", "train.gate_lambda=0.001",
                                   "model.mask_rate=0.4", "train.betas=0.9,0.999",
                                   "train.epochs=100", "model.patch_size=8", "model.num_heads=12"])
def test_a_drifted_preset_is_caught(drift):
    key = drift.split("=")[0]
    mismatches = paper_mismatches(load_config(preset("voc"), [drift]), "voc")
    assert len(mismatches) == 1 and mismatches[0].startswith(key)


def test_ade20k_size_is_rounded_and_dfc2020_labels():
    assert load_config(preset("ade20k")).model.img_size == [208, 320]
    data = load_config(preset("dfc2020")).data
    assert data.label_map == list(DFC2020_LABEL_MAP) and data.label_min_fraction == 0.1
    assert min(data.std) > 0 and data.mean[-2:] < [0.0, 0.0]  # S1 backscatter in dB


@pytest.mark.parametrize("name", PRESETS)
def test_cpu_preset_trains_one_epoch(name, tmp_path):
    root, run = tmp_path / "data", tmp_path / "run"
    num_classes = WRITERS[name](root)
    assert main(["train", "--config", str(preset(f"{name}_cpu")), f"data.root={root}",
                 f"out_dir={run}", *TINY]) == 0
    saved = load_config(run / "config.yaml")
    assert saved.data.name == FORMATS[name][0] and saved.model.embed_dim == 96
    assert load_file(run / "last.safetensors")["cls_token"].shape == (1, num_classes, 96)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    evals = [r["eval"] for r in records if "eval" in r]
    assert len(evals) == 1 and 0.0 <= evals[0]["map"] <= 1.0
