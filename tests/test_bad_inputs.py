"""Bad inputs and faults against the command line, one table: each case must end with exit code
2 (one line on stderr naming the offending file, key or value; no traceback) and leave every
file outside the command's output folder as it was."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from attnmaps.cli import main
from attnmaps.data.synthetic import write_synthetic_voc

TINY = ["model.img_size=32,32", "model.patch_size=8", "model.embed_dim=16", "model.depth=2",
        "model.num_heads=2", "train.batch_size=4", "train.epochs=1", "train.device=cpu",
        "train.warmup_epochs=0"]


@dataclass
class Env:
    """A fresh copy of the tiny dataset and of a trained run, and an output folder."""

    data: Path
    run: Path
    out: Path

    def train(self, *overrides: str, out_dir: Path | None = None) -> list[str]:
        return ["train", *TINY, f"data.root={self.data}",
                f"out_dir={out_dir or self.out / 'run'}", *overrides]


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    data = write_synthetic_voc(tmp_path_factory.mktemp("data") / "shapes", num_train=8,
                               num_val=4, size=(32, 32), seed=1)
    run = tmp_path_factory.mktemp("run") / "run"
    assert main(["train", *TINY, f"data.root={data}", f"out_dir={run}"]) == 0
    return data, run


@pytest.fixture
def env(originals: tuple[Path, Path], tmp_path: Path) -> Env:
    data, run = tmp_path / "shapes", tmp_path / "run"
    shutil.copytree(originals[0], data)
    shutil.copytree(originals[1], run)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace(str(originals[0]), str(data))
                      .replace(str(originals[1]), str(run)))
    return Env(data, run, tmp_path / "out")


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _manifest(env: Env, rows: str, name: str = "train.csv") -> list[str]:
    """A manifest dataset in env.data (images of the VOC copy) and its train command."""
    _write(env.data / name, rows)
    _write(env.data / "val.csv", "image,labels\nJPEGImages/synth_000008.png,circle\n")
    return env.train("data.name=manifest")


def _corrupt(path: Path, data: bytes = b"\x89PNG\r\n\x1a\n garbage") -> None:
    path.write_bytes(data)


def _resized_mask(path: Path) -> None:
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(path)


def _mask_value(path: Path, value: int) -> None:
    mask = np.array(Image.open(path))
    mask[0, 0] = value
    Image.fromarray(mask).save(path)


def _ids(env: Env, split: str) -> list[str]:
    return (env.data / "ImageSets/Segmentation" / f"{split}.txt").read_text().split()


def _image(env: Env, split: str, position: int = 0) -> Path:
    return env.data / "JPEGImages" / f"{_ids(env, split)[position]}.png"


def _mask(env: Env, split: str, position: int = 0) -> Path:
    return env.data / "SegmentationClass" / f"{_ids(env, split)[position]}.png"


# name -> (prepare(env) -> argv, text the error line must contain)
Case = tuple[Callable[[Env], list[str]], Callable[[Env], str] | str]
CASES: dict[str, Case] = {
    # ---- config keys, types and ranges
    "unknown key": (lambda e: e.train("train.lrr=1"), "train.lrr"),
    "did you mean": (lambda e: e.train("train.lrr=1"), "Did you mean 'train.lr'"),
    "bad type": (lambda e: e.train("train.lr=abc"), "train.lr"),
    "lr zero": (lambda e: e.train("train.lr=0"), "train.lr"),
    "lr negative": (lambda e: e.train("train.lr=-1"), "train.lr"),
    "lr nan": (lambda e: e.train("train.lr=.nan"), "train.lr"),
    "patch size zero": (lambda e: e.train("model.patch_size=0"), "model.patch_size"),
    "log_every zero": (lambda e: e.train("train.log_every=0"), "train.log_every"),
    "unknown device": (lambda e: e.train("train.device=banana"), "train.device"),
    "epochs zero": (lambda e: e.train("train.epochs=0"), "train.epochs"),
    "warmup negative": (lambda e: e.train("train.warmup_epochs=-1"), "train.warmup_epochs"),
    "workers negative": (lambda e: e.train("data.num_workers=-1"), "data.num_workers"),
    "threshold above 1": (lambda e: e.train("pseudo.threshold=1.5"), "pseudo.threshold"),
    "refine negative": (lambda e: e.train("pseudo.refine_iterations=-3"),
                        "pseudo.refine_iterations"),
    "prob threshold": (lambda e: e.train("pseudo.prob_threshold=2"), "pseudo.prob_threshold"),
    "mask rate": (lambda e: e.train("model.mask_rate=1.5"), "model.mask_rate"),
    "beta of 1": (lambda e: e.train("train.betas=[0.9,1.0]"), "train.betas"),
    "batch zero": (lambda e: e.train("train.batch_size=0"), "train.batch_size"),
    "depth zero": (lambda e: e.train("model.depth=0"), "model.depth"),
    "heads do not divide": (lambda e: e.train("model.num_heads=3"), "num_heads=3"),
    "stem choice": (lambda e: e.train("model.stem=resnet"), "model.stem"),
    "attn blocks": (lambda e: e.train("model.attn_blocks=first"), "model.attn_blocks"),
    "mask fraction": (lambda e: e.train("train.mask_fraction=2"), "train.mask_fraction"),
    "mean length": (lambda e: e.train("data.mean=[0.5]"), "data.mean"),
    "tta scale": (lambda e: e.train("pseudo.tta_scales=[0]"), "pseudo.tta_scales"),
    "malformed override": (lambda e: e.train("train.lr"), "train.lr"),
    "override a section": (lambda e: e.train("train=1"), "train"),
    "missing config file": (lambda e: ["train", "--config", str(e.out / "no.yaml")], "no.yaml"),
    "invalid yaml": (lambda e: ["train", "--config", str(_write(e.out / "bad.yaml", "a: [1"))],
                     "bad.yaml"),
    "yaml list": (lambda e: ["train", "--config", str(_write(e.out / "list.yaml", "- 1\n"))],
                  "list.yaml"),
    "unknown dataset": (lambda e: e.train("data.name=imagenet"), "imagenet"),
    "outside-root flag on voc": (lambda e: e.train("data.name=voc",
                                                   "data.allow_outside_root=true"),
                                 "data.allow_outside_root"),
    "out_dir is a file": (lambda e: e.train(out_dir=_write(e.out / "file", "x")), "is a file"),
    "cuda without cuda": (lambda e: e.train("train.device=cuda"), "train.device"),
    # ---- dataset parts
    "missing data root": (lambda e: e.train(f"data.root={e.out / 'nothing'}", "data.name=voc"),
                          "nothing"),
    "missing split": (lambda e: e.train("data.val_split=nope"), "nope"),
    "empty split file": (lambda e: (_write(e.data / "ImageSets/Segmentation/val.txt", "\n"),
                                    e.train())[1], "val.txt"),
    "duplicate class names": (lambda e: (_write(e.data / "classes.txt", "bg\na\na\n"),
                                         e.train())[1], "classes.txt"),
    "corrupt image": (lambda e: (_corrupt(_image(e, "train")), e.train())[1],
                      lambda e: _image(e, "train").name),
    "mask of another size": (lambda e: (_resized_mask(_mask(e, "val")), e.train())[1],
                             lambda e: _mask(e, "val").name),
    "mask value out of range (last val image)": (
        lambda e: (_mask_value(_mask(e, "val", -1), 9), e.train())[1],
        lambda e: _mask(e, "val", -1).stem),
    "corrupt mask": (lambda e: (_corrupt(_mask(e, "val")), e.train())[1],
                     lambda e: _mask(e, "val").name),
    # ---- manifests
    "manifest path leaves root": (
        lambda e: _manifest(e, "image,labels\n../outside/x.png,circle\n"), "leaves the data root"),
    "manifest absolute path": (
        lambda e: _manifest(e, "image,labels\n/etc/passwd,circle\n"), "leaves the data root"),
    "manifest misspelled column": (
        lambda e: _manifest(e, "image,labels,masks\nJPEGImages/synth_000000.png,circle,x.png\n"),
        "unknown column"),
    "manifest unknown class": (
        lambda e: _manifest(e, "image,labels\nJPEGImages/synth_000000.png,dragon\n"), "dragon"),
    "manifest without rows": (lambda e: _manifest(e, "image,labels\n"), "train.csv"),
    "manifest without header columns": (lambda e: _manifest(e, "path,classes\nx,y\n"),
                                        "train.csv"),
    "jsonl not json": (lambda e: _manifest(e, "{nope\n", name="train.jsonl"), "train.jsonl"),
    "manifest missing": (lambda e: e.train("data.name=manifest", "data.train_split=absent"),
                         "absent"),
    # ---- runs and checkpoints
    "existing run without --resume": (lambda e: e.train(out_dir=e.run), "--resume"),
    "resume without checkpoint": (lambda e: [*e.train(), "--resume"], "does not exist"),
    "resume with another lr": (lambda e: [*e.train("train.lr=0.5", out_dir=e.run), "--resume"],
                               "train.lr"),
    "resume with another batch": (lambda e: [*e.train("train.batch_size=2", out_dir=e.run),
                                             "--resume"], "train.batch_size"),
    "resume with another root": (
        lambda e: [*e.train(f"data.root={shutil.copytree(e.data, e.out / 'copy')}",
                            out_dir=e.run), "--resume"], "data.root"),
    "resume with fewer epochs": (
        lambda e: (_set_epochs(e.run, 3), [*e.train(out_dir=e.run), "--resume"])[1], "epochs"),
    "resume from truncated weights": (
        lambda e: (_corrupt(e.run / "last.safetensors"), [*e.train(out_dir=e.run), "--resume"])[1],
        "last.safetensors"),
    "resume from empty state": (
        lambda e: ((e.run / "last.state.pt").write_bytes(b""),
                   [*e.train(out_dir=e.run), "--resume"])[1], "last.state.pt"),
    "pseudo-masks of a non-run": (lambda e: ["pseudo-masks", "--run", str(e.data), "--out",
                                             str(e.out / "m")], "config.yaml"),
    "pseudo-masks from truncated weights": (
        lambda e: (_corrupt(e.run / "last.safetensors"),
                   ["pseudo-masks", "--run", str(e.run), "--out", str(e.out / "m")])[1],
        "last.safetensors"),
    "pseudo-masks of a missing split": (
        lambda e: ["pseudo-masks", "--run", str(e.run), "--out", str(e.out / "m"), "--split",
                   "test"], "test"),
    "sweep threshold above 1": (lambda e: ["sweep", "--run", str(e.run), "--thresholds", "1.5"],
                                "1.5"),
    "sweep threshold not a number": (
        lambda e: ["sweep", "--run", str(e.run), "--thresholds", "abc"], "abc"),
    # ---- evaluate
    "evaluate missing pred": (
        lambda e: ["evaluate", "--pred", str(e.out / "none"), "--gt",
                   str(e.data / "SegmentationClass")], "none"),
    "evaluate duplicate classes": (
        lambda e: ["evaluate", "--pred", str(e.data / "SegmentationClass"), "--gt",
                   str(e.data / "SegmentationClass"), "--classes",
                   str(_write(e.out / "c.txt", "bg\na\na\n"))], "c.txt"),
    "evaluate unknown id": (
        lambda e: ["evaluate", "--pred", str(e.data / "SegmentationClass"), "--gt",
                   str(e.data / "SegmentationClass"), "--ids",
                   str(_write(e.out / "ids.txt", "synth_000008\nghost\n"))], "ghost"),
    "evaluate empty ids list": (
        lambda e: ["evaluate", "--pred", str(e.data / "SegmentationClass"), "--gt",
                   str(e.data / "SegmentationClass"), "--ids",
                   str(_write(e.out / "none.txt", "\n"))], "lists no ids"),
    "evaluate without prediction": (
        lambda e: ["evaluate", "--pred", str(_write(e.out / "p" / "x.txt", "").parent), "--gt",
                   str(e.data / "SegmentationClass")], "no prediction"),
    "evaluate empty gt folder": (
        lambda e: ["evaluate", "--pred", str(e.data / "SegmentationClass"), "--gt",
                   str(_write(e.out / "g" / "x.txt", "").parent)], "no *.png"),
    # ---- a run that diverges
    "diverging run": (lambda e: e.train("train.lr=1e5", "train.grad_clip=null"), "NaN"),
}


def _set_epochs(run: Path, epochs: int) -> None:
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("epochs: 1\n", f"epochs: {epochs}\n"))


def _snapshot(root: Path, skip: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and skip not in p.parents}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_clear_line(name: str, env: Env, capsys: pytest.CaptureFixture,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    if name == "cuda without cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.delenv("ATTNMAPS_DEBUG", raising=False)
    prepare, expected = CASES[name]
    env.out.mkdir(parents=True, exist_ok=True)
    argv = prepare(env)
    before = _snapshot(env.out.parent, env.out)
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, f"exit code {code}, stderr: {err}"
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    wanted = expected(env) if callable(expected) else expected
    assert wanted in err, err
    assert _snapshot(env.out.parent, env.out) == before  # nothing outside the output changed


def test_table_covers_at_least_sixty_cases() -> None:
    assert len(CASES) >= 60


def test_pseudo_masks_never_write_outside_the_output_folder(env: Env,
                                                            capsys: pytest.CaptureFixture) -> None:
    """A manifest id that leaves the data root (accepted with allow_outside_root) must not turn
    into a mask path over the source image: refused before any work."""
    outside = env.out.parent / "outside"
    outside.mkdir()
    source = shutil.copy(_image(env, "val"), outside / "img.png")
    before = Path(source).read_bytes()
    root = env.out.parent / "manifest"
    _write(root / "classes.txt", "circle\nsquare\ntriangle\ncross\n")
    _write(root / "val.csv", "image,labels\n../outside/img.png,circle\n")
    code = main(["pseudo-masks", "--run", str(env.run), "--out", str(env.out / "m"),
                 "data.name=manifest", f"data.root={root}", "data.allow_outside_root=true"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot name a file inside the output folder" in err, err
    assert Path(source).read_bytes() == before


def test_debug_shows_the_traceback(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNMAPS_DEBUG", "1")
    with pytest.raises(ValueError, match="train.lr"):
        main(env.train("train.lr=0"))


def test_log_of_a_diverged_run_names_the_last_good_epoch(env: Env,
                                                         capsys: pytest.CaptureFixture) -> None:
    """Resuming a healthy run with a learning rate that blows up: no NaN checkpoint replaces the
    last good one, and the message names it."""
    good = (env.run / "last.safetensors").read_bytes()
    code = main([*env.train("train.lr=1e5", "train.grad_clip=null", "train.epochs=3",
                            out_dir=env.run), "--resume", "--allow-changes"])
    err = capsys.readouterr().err
    assert code == 2 and "epoch 1" in err and "last good checkpoint" in err, err
    assert (env.run / "last.safetensors").read_bytes() == good
    log = [json.loads(line) for line in (env.run / "log.jsonl").read_text().splitlines()]
    assert log


def test_an_error_in_a_loader_worker_is_one_line(env: Env, capsys: pytest.CaptureFixture) -> None:
    _corrupt(_image(env, "train"))
    assert main(env.train("data.num_workers=1")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert _image(env, "train").name in err


def test_resume_accepts_a_config_written_before_new_keys(env: Env) -> None:
    """Keys added to the config since a run was written count at their defaults."""
    config = env.run / "config.yaml"
    config.write_text(config.read_text().replace("  checkpoint_every: 200\n", ""))
    assert main([*env.train("train.epochs=2", out_dir=env.run), "--resume"]) == 0
