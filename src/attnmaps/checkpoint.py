"""Resumable checkpoints: model weights as safetensors plus a ``weights_only``-loadable state file.

A checkpoint ``<tag>`` in ``run_dir`` is the pair ``<tag>.safetensors`` / ``<tag>.state.pt``.
Both files are written to temporary siblings first and then moved into place, so a failed save
leaves the previous pair intact; the pair it replaces is kept as ``<tag>.prev.*``, and
:func:`load_checkpoint` falls back to it (with a warning) when ``<tag>`` is missing or damaged.
Temporary files left by a killed save are removed by the next save. Example::

    save_checkpoint(run_dir, model, {"optimizer": opt.state_dict(), "epoch": 3,
                                     "rng": capture_rng_state()})
    state = load_checkpoint(run_dir, model)
    restore_rng_state(state["rng"])
"""

import os
import pickle
import random
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_model
from torch import nn

from .atomic import atomic_write
from .errors import CheckpointError

_ID_KEY = "checkpoint_id"


def checkpoint_paths(run_dir: str | Path, tag: str = "last") -> tuple[Path, Path]:
    """``(weights, state)`` file paths of checkpoint ``tag`` in ``run_dir``."""
    if not tag or any(sep in tag for sep in ("/", "\\")):
        raise ValueError(f"Checkpoint tag {tag!r} must be a non-empty file name without '/'")
    run_dir = Path(run_dir)
    return run_dir / f"{tag}.safetensors", run_dir / f"{tag}.state.pt"


def has_checkpoint(run_dir: str | Path, tag: str = "last") -> bool:
    """Whether ``run_dir`` holds any file of checkpoint ``tag`` or of the ``<tag>.prev`` pair
    kept beside it: what :func:`load_checkpoint` can start from (a save killed after moving the
    current pair aside leaves only ``<tag>.prev``)."""
    pairs = (*checkpoint_paths(run_dir, tag), *checkpoint_paths(run_dir, f"{tag}.prev"))
    return any(path.is_file() for path in pairs)


def save_checkpoint(
    run_dir: str | Path, model: nn.Module, extra_state: dict[str, Any], *, tag: str = "last",
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Atomically save ``model``'s weights and ``extra_state`` as checkpoint ``tag``.

    ``extra_state`` may hold tensors, numbers, strings, lists, tuples and dicts (e.g. optimizer
    and scheduler state dicts, epoch, step, :func:`capture_rng_state`). Tied (shared) tensors
    are stored once. ``metadata`` (strings) goes into the weights file's safetensors header
    (see :func:`read_metadata`), e.g. what is needed to rebuild the model.
    """
    weights_path, state_path = checkpoint_paths(run_dir, tag)
    metadata = dict(metadata or {})
    for name, mapping in (("extra_state", extra_state), ("metadata", metadata)):
        if _ID_KEY in mapping:
            raise ValueError(f"{name} must not use the reserved key {_ID_KEY!r}")
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    for stale in weights_path.parent.glob(f".{tag}.*.tmp"):
        stale.unlink(missing_ok=True)
    pair_id = uuid.uuid4().hex
    previous = checkpoint_paths(run_dir, f"{tag}.prev")

    def keep_previous() -> None:
        """Called once both new files are written: the current pair becomes ``<tag>.prev``."""
        if weights_path.is_file() and state_path.is_file():
            os.replace(weights_path, previous[0])
            os.replace(state_path, previous[1])

    atomic_write(
        {
            weights_path: lambda tmp: save_model(
                model, str(tmp), metadata={**metadata, _ID_KEY: pair_id}, force_contiguous=True
            ),
            state_path: lambda tmp: torch.save({**extra_state, _ID_KEY: pair_id}, tmp),
        },
        before_replace=keep_previous,
    )


def load_checkpoint(
    run_dir: str | Path,
    model: nn.Module,
    *,
    tag: str = "last",
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Load checkpoint ``tag`` into ``model`` (strictly) and return its ``extra_state``.

    When that pair is missing, damaged or torn (a save killed while moving files), the newest
    weights/state pair from one save among ``<tag>`` and ``<tag>.prev`` is loaded instead, with
    a warning naming the problem, so a kill at any point of a save loses at most that save.
    Raises ``FileNotFoundError`` when ``<tag>`` was never saved and
    :class:`~attnmaps.errors.CheckpointError` naming the files when no pair can be used.
    """
    current, previous = checkpoint_paths(run_dir, tag), checkpoint_paths(run_dir, f"{tag}.prev")
    if not has_checkpoint(run_dir, tag):
        raise FileNotFoundError(f"Checkpoint file not found: {current[0]} (no checkpoint "
                                f"{tag!r} in {run_dir})")
    problems = []
    for weights_path, state_path in ((current[0], current[1]), (current[0], previous[1]),
                                     (previous[0], current[1]), (previous[0], previous[1])):
        try:
            state = _load_pair(weights_path, state_path, model, map_location)
        except (CheckpointError, FileNotFoundError) as error:
            problems.append(str(error))
            continue
        if problems:
            warnings.warn(f"{problems[0]}; resumed from {weights_path.name} + {state_path.name} "
                          "(the newest complete checkpoint) instead", stacklevel=2)
        return state
    raise CheckpointError("no usable checkpoint in " + str(run_dir) + ": "
                          + "; ".join(dict.fromkeys(problems)))


def _load_pair(weights_path: Path, state_path: Path, model: nn.Module,
               map_location: str | torch.device) -> dict[str, Any]:
    """The state of one weights/state pair, its weights loaded into ``model``."""
    for path in (weights_path, state_path):
        if not path.is_file():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
    weights_id = read_metadata(weights_path).get(_ID_KEY)
    try:
        state = torch.load(state_path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as exc:
        first_line = (str(exc).splitlines() or [""])[0]
        raise CheckpointError(f"{state_path} is damaged or not a checkpoint state file "
                              f"({type(exc).__name__}: {first_line})") from None
    if state.pop(_ID_KEY, None) != weights_id:
        raise CheckpointError(f"{weights_path} and {state_path} come from different saves")
    load_weights(weights_path, model)
    return state


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata in the header of a ``.safetensors`` file (empty when none)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Weights file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except SafetensorError as exc:
        raise CheckpointError(f"{path} is damaged or not a safetensors file ({exc})") from None


def load_weights(path: str | Path, model: nn.Module) -> None:
    """Load a bare ``.safetensors`` file into ``model`` strictly.

    A key missing from the file is accepted when it is tied to (shares storage with) a key that
    the file has. Nothing is loaded when keys or shapes do not match. A model with an
    ``upgrade_state_dict(tensors)`` method (as :class:`~attnmaps.models.vit.ClassTokenViT`)
    first renames the keys of files written under older names.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Weights file not found: {path}")
    try:
        tensors = load_file(path)
    except SafetensorError as exc:
        raise CheckpointError(f"{path} is damaged or not a safetensors file ({exc})") from None
    upgrade = getattr(model, "upgrade_state_dict", None)
    if upgrade is not None:
        tensors = upgrade(tensors)
    expected = model.state_dict()
    stored = {_storage_key(t): name for name, t in expected.items() if name in tensors}
    full = {
        name: tensors[name] if name in tensors else tensors[stored[_storage_key(t)]]
        for name, t in expected.items()
        if name in tensors or _storage_key(t) in stored
    }
    missing = sorted(set(expected) - set(full))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = [
        f"{name} {tuple(full[name].shape)} vs {tuple(t.shape)}"
        for name, t in expected.items()
        if name in full and full[name].shape != t.shape
    ]
    if missing or unexpected or mismatched:
        problems = [
            f"{label}: {', '.join(names)}"
            for label, names in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches (file vs model)", mismatched),
            )
            if names
        ]
        raise CheckpointError(
            f"Weights in {path} do not match {type(model).__name__}; " + "; ".join(problems)
        )
    model.load_state_dict(full)


def _storage_key(t: torch.Tensor) -> tuple:
    """Identity of the memory a tensor views; equal for tied tensors."""
    if t.numel() == 0:
        return ("empty", id(t))
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride())


def capture_rng_state() -> dict[str, Any]:
    """Torch (CPU and CUDA), Python ``random`` and NumPy global RNG states, as plain data."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss_next],
        "numpy": [str(name), keys.tolist(), int(pos), int(has_gauss), float(cached_gaussian)],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng_state` captured.

    The CUDA states are restored only when as many CUDA devices are visible as were saved.
    """
    torch.set_rng_state(state["torch"].cpu())
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
