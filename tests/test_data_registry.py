import json

import numpy as np
import pytest
from PIL import Image

from attnmaps.config import Config, apply_overrides
from attnmaps.data.ade20k import ADE20KDataset
from attnmaps.data.coco import COCODataset
from attnmaps.data.folder import FolderDataset
from attnmaps.data.geotiff import GeoTIFFDataset
from attnmaps.data.image_io import write_image
from attnmaps.data.manifest import ManifestDataset
from attnmaps.data.registry import DATASETS, build_dataset
from attnmaps.data.voc import VOCDataset


def _png(path, size=(8, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(path, np.zeros((*size, 3), np.uint8))


def _coco(root) -> None:
    _png(root / "train" / "1.png")
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_train.json").write_text(json.dumps(
        {"images": [{"id": 1, "file_name": "1.png", "height": 8, "width": 8}],
         "annotations": [], "categories": [{"id": 1, "name": "person"}]}))


def _ade(root) -> None:
    _png(root / "images" / "training" / "a.jpg")
    (root / "annotations" / "training").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "annotations" / "training" / "a.png")


def _voc(root) -> None:
    _png(root / "JPEGImages" / "a.png")
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("a\n")
    (root / "Annotations").mkdir()
    (root / "Annotations" / "a.xml").write_text("<annotation></annotation>")


def _folder(root) -> None:
    _png(root / "train" / "cat" / "x.png")


def _manifest(root) -> None:
    _png(root / "x.png")
    (root / "train.csv").write_text("image,labels\nx.png,cat\n")


def _geotiff(root) -> None:
    tifffile = pytest.importorskip("tifffile")
    for sub in ("images", "masks", "splits"):
        (root / sub).mkdir(parents=True)
    tifffile.imwrite(root / "images" / "a.tif", np.zeros((4, 8, 8), np.uint16),
                     planarconfig="separate", photometric="minisblack")
    tifffile.imwrite(root / "masks" / "a.tif", np.ones((8, 8), np.uint8))
    (root / "splits" / "train.txt").write_text("a\n")
    (root / "classes.txt").write_text("x\ny\n")


BUILDERS = {"voc": (_voc, VOCDataset), "coco": (_coco, COCODataset),
            "ade20k": (_ade, ADE20KDataset), "folder": (_folder, FolderDataset),
            "manifest": (_manifest, ManifestDataset), "geotiff": (_geotiff, GeoTIFFDataset)}


def _cfg(name: str, root, *extra: str):
    return apply_overrides(Config(), [f"data.name={name}", f"data.root={root}", *extra]).data


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_each_format_builds(tmp_path, name):
    write, cls = BUILDERS[name]
    write(tmp_path)
    extra = ["model.in_chans=4", "data.mean=0,0,0,0", "data.std=1,1,1,1",
             "data.label_map=[255,0]"] if name == "geotiff" else []
    cfg = _cfg(name, tmp_path, "data.image_size=4,4", "data.crop_scale=0.5,1.0",
               "data.rotate=10", *extra)
    train = build_dataset(cfg, "train", train=True)
    assert type(train) is cls and train[0]["image"].shape[1:] == (4, 4)
    assert train.augment.hflip and train.augment.crop_scale == (0.5, 1.0)
    assert train.augment.rotate == 10.0
    evaluation = build_dataset(cfg, "train", train=False)
    assert not evaluation.augment.hflip and evaluation.augment.crop_scale is None
    assert evaluation.augment.rotate == 0.0 and evaluation.image_size == (4, 4)


def test_names_and_synthetic(tmp_path):
    assert DATASETS == ("voc", "synthetic", "coco", "ade20k", "geotiff", "folder", "manifest")
    with pytest.raises(ValueError, match=r"data\.name='cityscapes' is not a known dataset"):
        build_dataset(_cfg("cityscapes", tmp_path), "train", train=False)
    with pytest.raises(ValueError, match=r"data\.root is not set"):
        build_dataset(apply_overrides(Config(), ["data.name=voc"]).data, "train", train=False)


def test_background_option(tmp_path):
    _ade(tmp_path)
    assert not build_dataset(_cfg("ade20k", tmp_path), "train", train=False).has_background
    with_other = build_dataset(_cfg("ade20k", tmp_path, "data.has_background=true"), "train",
                               train=False)
    assert with_other.has_background and with_other.class_names[0] == "other"
    coco = tmp_path / "coco"
    _coco(coco)
    with pytest.raises(ValueError, match=r"data\.has_background=false does not apply to "
                                         r"data\.name=coco"):
        build_dataset(_cfg("coco", coco, "data.has_background=false"), "train", train=False)
    assert build_dataset(_cfg("coco", coco, "data.has_background=true"), "train",
                         train=False).has_background


def test_geotiff_only_keys(tmp_path):
    _folder(tmp_path)
    for key in ("data.label_map=[0,1]", "data.label_min_fraction=0.1"):
        with pytest.raises(ValueError, match=rf"{key.split('=')[0]} applies to data\.name=geotiff "
                                             r"only"):
            build_dataset(_cfg("folder", tmp_path, key), "train", train=False)


def test_color_jitter_on_multiband_raises(tmp_path):
    _geotiff(tmp_path)
    cfg = _cfg("geotiff", tmp_path, "model.in_chans=4", "data.mean=0,0,0,0", "data.std=1,1,1,1",
               "data.color_jitter=0.2", "data.label_map=[255,0]")
    with pytest.raises(ValueError, match=r"color_jitter applies to RGB images only"):
        build_dataset(cfg, "train", train=True)[0]
    assert build_dataset(cfg, "train", train=False)[0]["labels"].tolist() == [1.0, 0.0]
