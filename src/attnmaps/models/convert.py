"""Import pretrained timm / DeiT / DINO / DINOv2 ViT weights into a :class:`ClassTokenViT`.

Works on state dicts alone (no timm, no downloads). Source layouts:

* timm ViT / DeiT (incl. distilled) / DINO: ``cls_token``, optional ``dist_token`` and
  ``reg_token``, ``pos_embed`` [1, prefix + N, D], ``patch_embed.proj``,
  ``blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``.
* DINOv2 (facebookresearch hub): the same names plus ``blocks.i.ls1.gamma`` / ``ls2.gamma``,
  ``mask_token``, optional ``register_tokens`` and chunked ``blocks.c.i.`` keys.

Keys may carry ``model.`` / ``module.`` / ``backbone.`` / ``teacher.`` / ``student.`` prefixes
and sit in ``model`` / ``state_dict`` / ``teacher`` containers (``teacher`` wins over
``student``). The mapping is exact: with one class token, no registers (or the source's) and
the source grid, the converted model's class-token and patch outputs equal the source ViT's
[CLS] and patch outputs.

* Every class token starts as ``cls_token`` plus the [CLS] position embedding (ClassTokenViT has
  no position embedding for class tokens, so it is folded into the token).
* Register tokens come from the source registers (plus their position embeddings, if any) when
  the counts match, otherwise from the class token as above.
* Patch position embeddings lose the prefix slots and are resampled bicubically to the model's
  grid, as :meth:`ClassTokenViT._pos_embed` does at run time.
* Layer scale is folded into the preceding linear layer: ``g * (W x + b) = (g W) x + g b``.
* ``adapt_channels=True`` maps an RGB stem to C input channels by giving every channel the
  channel-sum of the source filter divided by C (the mean RGB filter scaled by 3/C), so an
  image whose C channels all equal a grey image responds as the source did to that grey image.
* ``adapt_patch_size=True`` resamples the patch kernel to the model's patch size by the
  pseudo-inverse resize of FlexiViT (Beyer et al., CVPR 2023), see
  :func:`resample_patch_kernel`: a patch resized (bilinearly) to the new size gives the token
  the source gave the original patch. Exact when enlarging the patch (e.g. 14 -> 16); when
  shrinking it (16 -> 14 or 8) a least-squares fit, exact only for patches that are themselves
  the adjoint resize of a small patch (for 16 -> 8, those constant on 2x2 pixel blocks).

Example::

    report = load_pretrained("dinov2_vits14_pretrain.pth", model)
    print(report)
"""

from __future__ import annotations

import math
import pickle
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor

from .vit import ClassTokenViT, resample_pos_embed

_PATCH_KEY = "patch_embed.proj.weight"
_PREFIXES = ("model.", "module.", "backbone.", "teacher.", "student.")
_CONTAINERS = ("teacher", "model", "state_dict")
# Source keys that may go unused (listed as dropped).
_UNUSED_KEYS = ("mask_token", "dist_token", "register_tokens", "reg_token")
_DROPPED_PREFIXES = ("head.", "head_dist.", "fc_norm.", "pre_logits.")
# Block keys, named alike in timm / DINOv2 and ClassTokenViT.
_BLOCK_KEYS = tuple(f"{layer}.{kind}" for layer in ("norm1", "attn.qkv", "attn.proj", "norm2",
                                                    "mlp.fc1", "mlp.fc2")
                    for kind in ("weight", "bias"))
# Layer scale ``blocks.i.<key>`` multiplies the output of the linear layer ``blocks.i.<value>``
# (timm / DINOv2 names, and the original DeiT III names).
_LAYER_SCALES = {"ls1.gamma": "attn.proj", "ls2.gamma": "mlp.fc2",
                 "gamma_1": "attn.proj", "gamma_2": "mlp.fc2"}
# Heads of the standard ViT widths (ViT-Ti/S/B/L/H/g, DINOv2-g); used when num_heads is not given.
STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16, 1536: 24}


@dataclass
class ConversionReport:
    """What a conversion did, by ClassTokenViT key (``loaded``, ``fresh``) and source key
    (``dropped``)."""

    source: str
    loaded: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [(f"Converted a {self.source} checkpoint: {len(self.loaded)} tensors loaded, "
                  f"{len(self.fresh)} initialised fresh, {len(self.dropped)} dropped")]
        for label, keys in (("initialised fresh", self.fresh), ("dropped", self.dropped)):
            if keys:
                lines.append(f"  {label}: {_summarise(keys)}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _summarise(keys: list[str]) -> str:
    """Keys with block indices collapsed: ``blocks.*.attn.gate.log_alpha (x12)``."""
    counts = Counter(re.sub(r"^blocks\.\d+\.", "blocks.*.", key) for key in keys)
    return ", ".join(f"{key} (x{n})" if n > 1 else key for key, n in counts.items())


def unwrap_checkpoint(obj: Any) -> tuple[dict[str, Tensor], list[str]]:
    """The tensor state dict inside common containers (``teacher`` before ``model`` before
    ``state_dict``), and notes on what was picked."""
    notes = []
    while isinstance(obj, Mapping) and not any(isinstance(v, Tensor) for v in obj.values()):
        name = next((c for c in _CONTAINERS if isinstance(obj.get(c), Mapping)), None)
        if name is None:
            break
        notes.append(f"used the {name!r} entry of a checkpoint with entries {sorted(obj)}")
        obj = obj[name]
    if not isinstance(obj, Mapping) or not any(isinstance(v, Tensor) for v in obj.values()):
        entries = sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(f"No tensor state dict found in the checkpoint (entries: {entries}); "
                         f"expected a state dict or one under {list(_CONTAINERS)}")
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}, notes


def _select_backbone(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str], str]:
    """Keys under the backbone prefix (stripped, chunked blocks flattened, float32), the keys
    left out, and the prefix."""
    found = [k[: -len(_PATCH_KEY)] for k in state_dict if k.endswith(_PATCH_KEY)]
    if not found:
        sample = ", ".join(list(state_dict)[:5])
        raise ValueError(f"Not a ViT checkpoint: no key ends in {_PATCH_KEY!r} (keys start: "
                         f"{sample})")
    if len(found) > 1:
        teachers = [p for p in found if "teacher" in p]
        if len(teachers) != 1:
            raise ValueError(f"Several ViT backbones in one checkpoint (prefixes {found}); "
                             "pass the state dict of one")
        found = teachers
    prefix = found[0]
    rest = prefix
    while rest:
        head = next((p for p in _PREFIXES if rest.startswith(p)), None)
        if head is None:
            raise ValueError(f"Unknown key prefix {prefix!r} on {prefix + _PATCH_KEY!r}; "
                             f"expected a combination of {list(_PREFIXES)}")
        rest = rest[len(head):]
    chunked = re.compile(r"^blocks\.\d+\.(\d+)\.")
    selected = {}
    for key, value in state_dict.items():
        if key.startswith(prefix):
            selected[chunked.sub(r"blocks.\1.", key[len(prefix):])] = value.float()
    return selected, sorted(k for k in state_dict if not k.startswith(prefix)), prefix


def _mismatch(key: str, source: Any, model: Any, setting: str) -> ValueError:
    return ValueError(f"Checkpoint does not fit the model at {key!r}: checkpoint {source}, model "
                      f"{model}; set {setting}")


def resize_matrix(old: tuple[int, int], new: tuple[int, int]) -> Tensor:
    """The matrix [new_h*new_w, old_h*old_w] (float64) of bilinear resizing (``align_corners=
    False``, no antialiasing, as ``F.interpolate``) of a flattened ``old`` image to ``new``."""
    count = old[0] * old[1]
    basis = torch.eye(count, dtype=torch.float64).reshape(count, 1, *old)
    resized = F.interpolate(basis, size=new, mode="bilinear", align_corners=False)
    return resized.reshape(count, -1).T


def resample_patch_kernel(weight: Tensor, patch_size: int) -> Tensor:
    """Patch-embedding kernel [D,C,p,p] resampled to [D,C,q,q] by pseudo-inverse resize.

    With ``B`` the bilinear resize matrix from p x p to q x q patches, the new kernel is
    ``w' = pinv(B^T) w``, the least-squares solution of ``<w', B x> = <w, x>`` for all
    patches ``x``; exact when ``q >= p`` (``B`` has full column rank).

    Example:
        >>> resample_patch_kernel(torch.randn(8, 3, 16, 16), 14).shape
        torch.Size([8, 3, 14, 14])
    """
    old = tuple(weight.shape[-2:])
    pinv = torch.linalg.pinv(resize_matrix(old, (patch_size, patch_size)).T)
    resampled = weight.flatten(2).double() @ pinv.T
    return resampled.reshape(*weight.shape[:2], patch_size, patch_size).to(weight.dtype)


def _check_fits(src: dict[str, Tensor], model: ClassTokenViT, adapt_channels: bool,
                adapt_patch_size: bool, num_heads: int | None) -> list[str]:
    """Raise on a model shape that cannot take the checkpoint; return notes."""
    if _PATCH_KEY not in model.state_dict():
        raise ValueError(f"Pretrained ViTs have a linear patch embedding ({_PATCH_KEY!r}) but the "
                         f"model has a {type(model.patch_embed).__name__}; set model.stem=linear")
    weight = src[_PATCH_KEY]
    dim, chans, patch = weight.shape[0], weight.shape[1], weight.shape[-1]
    if dim != model.pos_embed.shape[-1]:
        raise _mismatch(_PATCH_KEY, f"embed_dim={dim}", f"embed_dim={model.pos_embed.shape[-1]}",
                        f"model.embed_dim={dim}")
    notes = []
    if tuple(weight.shape[-2:]) != (model.patch_size,) * 2:
        if not adapt_patch_size or weight.shape[-2] != weight.shape[-1]:
            raise _mismatch(_PATCH_KEY, f"patch size {tuple(weight.shape[-2:])}",
                            f"patch_size={model.patch_size}",
                            f"model.patch_size={patch}, or pass adapt_patch_size=True to "
                            "resample the square kernel")
        notes.append(f"patch embedding resampled from {patch}x{patch} to {model.patch_size}x"
                     f"{model.patch_size} pixels (FlexiViT pseudo-inverse resize"
                     f"{'' if model.patch_size >= patch else ', least squares when shrinking'})")
    if chans != model.in_chans:
        if not adapt_channels:
            raise _mismatch(_PATCH_KEY, f"in_chans={chans}", f"in_chans={model.in_chans}",
                            f"model.in_chans={chans}, or pass adapt_channels=True to spread the "
                            "filters over the model's channels")
        notes.append(f"patch embedding adapted from {chans} to {model.in_chans} input channels: "
                     f"every channel gets the channel-sum of the filter / {model.in_chans}")
    depth = 1 + max((int(m[1]) for k in src if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if depth != len(model.blocks):
        raise _mismatch("blocks.*", f"depth={depth}", f"depth={len(model.blocks)}",
                        f"model.depth={depth}")
    heads = num_heads if num_heads is not None else STANDARD_HEADS.get(dim)
    model_heads = model.blocks[0].attn.num_heads
    if heads is None:
        notes.append(f"embed_dim={dim} is not a standard ViT width; could not check that the "
                     f"checkpoint has model.num_heads={model_heads} heads")
    elif heads != model_heads:
        raise _mismatch("blocks.0.attn.qkv.weight", f"num_heads={heads}",
                        f"num_heads={model_heads}", f"model.num_heads={heads}")
    hidden = src["blocks.0.mlp.fc1.weight"].shape[0] if "blocks.0.mlp.fc1.weight" in src else None
    if hidden is not None and hidden != model.blocks[0].mlp.fc1.out_features:
        raise _mismatch("blocks.0.mlp.fc1.weight", f"hidden={hidden}",
                        f"hidden={model.blocks[0].mlp.fc1.out_features}",
                        f"model.mlp_ratio={hidden / dim:g}")
    if "blocks.0.attn.qkv.bias" in src and model.blocks[0].attn.qkv.bias is None:
        raise _mismatch("blocks.0.attn.qkv.bias", "has a qkv bias", "has none",
                        "model.qkv_bias=true")
    return notes


class _Source(dict):
    """Source tensors that remember which of them were taken."""

    def __init__(self, tensors: Mapping[str, Tensor]):
        super().__init__(tensors)
        self.used: set[str] = set()

    def take(self, key: str) -> Tensor:
        self.used.add(key)
        return self[key]


def _prefix_slots(pos_len: int, candidates: tuple[int, ...]) -> tuple[int, tuple[int, int]]:
    """The first of ``candidates`` prefix slots that leaves ``pos_embed`` a square patch grid,
    and that grid."""
    for slots in dict.fromkeys(candidates):
        side = math.isqrt(max(pos_len - slots, 0))
        if side > 0 and side * side == pos_len - slots:
            return slots, (side, side)
    raise ValueError(f"pos_embed has {pos_len} positions, which is not a square patch grid after "
                     f"any of {sorted(set(candidates))} prefix slots")


def convert_state_dict(state_dict: Mapping[str, Any], model: ClassTokenViT, *,
                       adapt_channels: bool = False, adapt_patch_size: bool = False,
                       num_heads: int | None = None) -> tuple[dict[str, Tensor], ConversionReport]:
    """Map a timm / DeiT / DINO / DINOv2 ViT state dict onto ``model``'s keys.

    Args:
        state_dict: source tensors (containers and prefixes are handled, see the module doc).
        model: the target; must use ``stem="linear"`` and the source's patch size, width, depth,
            heads and MLP ratio.
        adapt_channels: allow ``model.in_chans`` to differ from the source's input channels.
        adapt_patch_size: allow ``model.patch_size`` to differ from the source's (square)
            patch size; the kernel is resampled by :func:`resample_patch_kernel`.
        num_heads: the source's heads; ``None`` assumes the standard heads of its width
            (:data:`STANDARD_HEADS`) and skips the check for other widths.

    Returns the converted tensors (for ``model.load_state_dict(..., strict=False)``) and a
    :class:`ConversionReport`. Raises ``ValueError`` naming the key, both values and the
    ``model.*`` setting to change when the shapes disagree, and on source keys it cannot map.
    """
    tensors, notes = unwrap_checkpoint(state_dict)
    selected, dropped, prefix = _select_backbone(tensors)
    if prefix:
        notes.append(f"used the keys under the prefix {prefix!r}")
    src = _Source(selected)
    notes += _check_fits(src, model, adapt_channels, adapt_patch_size, num_heads)
    source = "dinov2" if "mask_token" in src or "register_tokens" in src else "timm"

    out: dict[str, Tensor] = {}
    weight = src.take(_PATCH_KEY)
    if weight.shape[-1] != model.patch_size:
        weight = resample_patch_kernel(weight, model.patch_size)
    if weight.shape[1] != model.in_chans:
        weight = weight.sum(1, keepdim=True).expand(-1, model.in_chans, -1, -1) / model.in_chans
    out[_PATCH_KEY] = weight
    if "patch_embed.proj.bias" in src:
        out["patch_embed.proj.bias"] = src.take("patch_embed.proj.bias")
    notes += _convert_tokens(src, model, out)
    blocks = [(key, re.match(r"blocks\.(\d+)\.(.+)$", key)) for key in src]
    for key, match in blocks:
        if match and match[2] in _BLOCK_KEYS:
            out[key] = src.take(key)
    for key, match in blocks:
        if match and match[2] in _LAYER_SCALES:
            gamma, layer = src.take(key), f"blocks.{match[1]}.{_LAYER_SCALES[match[2]]}"
            out[f"{layer}.weight"] = gamma[:, None] * out[f"{layer}.weight"]
            out[f"{layer}.bias"] = gamma * out[f"{layer}.bias"]
    if any(match and match[2] in _LAYER_SCALES for _, match in blocks):
        notes.append("layer scale folded into attn.proj and mlp.fc2")
    for key in ("norm.weight", "norm.bias"):
        if key in src:
            out[key] = src.take(key)

    expected = model.state_dict()
    for i in range(len(model.blocks)):
        bias = f"blocks.{i}.attn.qkv.bias"
        if bias in expected and bias not in out and f"blocks.{i}.attn.qkv.weight" in out:
            out[bias] = torch.zeros(expected[bias].shape)
            if i == 0:
                notes.append("the checkpoint has no qkv bias; attn.qkv.bias set to zero")
    unknown = sorted(k for k in src if k not in src.used and k not in _UNUSED_KEYS
                     and not k.startswith(_DROPPED_PREFIXES))
    if unknown:
        raise ValueError(f"Checkpoint keys that ClassTokenViT cannot represent: {unknown}; "
                         "only plain pre-norm ViT blocks (MLP fc1/fc2, optional layer scale) "
                         "are supported")
    for key, value in out.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"Converted {key!r} has shape {tuple(value.shape)} but the model "
                             f"expects {tuple(expected[key].shape)}")
        out[key] = value.to(expected[key].dtype)
    dropped += sorted(prefix + k for k in src if k not in src.used)
    report = ConversionReport(source, loaded=[k for k in expected if k in out],
                              fresh=[k for k in expected if k not in out], dropped=dropped,
                              notes=notes)
    return out, report


def _convert_tokens(src: _Source, model: ClassTokenViT, out: dict[str, Tensor]) -> list[str]:
    """Fill ``pos_embed``, ``cls_token`` and ``reg_token`` of ``out``; return notes."""
    notes = []
    dim = model.pos_embed.shape[-1]
    reg_key = next((k for k in ("register_tokens", "reg_token") if k in src), None)
    num_regs = src[reg_key].shape[1] if reg_key else 0
    num_cls, num_dist = int("cls_token" in src), int("dist_token" in src)
    slots, pos = 0, None
    if "pos_embed" in src:
        pos = src.take("pos_embed")
        slots, grid = _prefix_slots(pos.shape[1], (num_cls + num_dist + num_regs,
                                                   num_cls + num_dist, 0))
        if grid != model.grid:
            notes.append(f"patch position embeddings resampled bicubically from a {grid[0]}x"
                         f"{grid[1]} to a {model.grid[0]}x{model.grid[1]} grid")
        out["pos_embed"] = resample_pos_embed(pos[:, slots:], grid, model.grid)
    if num_dist:
        notes.append(f"dist_token{' and its position slot' if slots else ''} dropped")
    if num_cls:
        cls = src.take("cls_token").reshape(1, 1, dim)
        if slots:
            cls = cls + pos[:, :1]
        else:
            notes.append("the checkpoint has no position embedding for cls_token")
        out["cls_token"] = cls.expand(1, model.num_classes, dim).clone()
        if model.num_classes > 1:
            notes.append(f"all {model.num_classes} class tokens start from the checkpoint's "
                         "cls_token (+ its position embedding)")
    if model.num_registers == 0:
        out["reg_token"] = torch.zeros(1, 0, dim)
    elif num_regs == model.num_registers:
        regs = src.take(reg_key)
        if num_regs and slots == num_cls + num_dist + num_regs:
            regs = regs + pos[:, num_cls:num_cls + num_regs]
        out["reg_token"] = regs
    elif num_cls:
        out["reg_token"] = out["cls_token"][:, :1].expand(1, model.num_registers, dim).clone()
        notes.append(f"the model's register tokens ({model.num_registers}) start from the "
                     f"cls_token (+ its position embedding) because the checkpoint has {num_regs}")
    return notes


def read_checkpoint(path: str | Path) -> Mapping[str, Any]:
    """The mapping stored in a ``.safetensors`` or ``.pth`` / ``.pt`` / ``.bin`` file, read with
    ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(path)
    if path.suffix not in (".pth", ".pt", ".bin"):
        raise ValueError(f"Unknown checkpoint format {path.suffix!r} ({path}); expected "
                         ".safetensors, .pth, .pt or .bin")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{path} holds objects other than tensors and plain containers, so it cannot be read "
            f"safely (weights_only=True): {str(exc).splitlines()[0]}. Save only its state dict, "
            "e.g. torch.save(torch.load(path, weights_only=False)['teacher'], 'teacher.pth')"
        ) from None
    if not isinstance(obj, Mapping):
        raise TypeError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return obj


def load_pretrained(path: str | Path, model: ClassTokenViT, adapt_channels: bool = False,
                    num_heads: int | None = None,
                    adapt_patch_size: bool = False) -> ConversionReport:
    """Convert a foreign ViT checkpoint file (see :func:`convert_state_dict`) into ``model``.

    The model's head, gates and anything else the converter does not produce keep their
    initialisation; every backbone tensor must come from the checkpoint, else ``ValueError``.
    """
    converted, report = convert_state_dict(read_checkpoint(path), model,
                                           adapt_channels=adapt_channels,
                                           adapt_patch_size=adapt_patch_size,
                                           num_heads=num_heads)
    missing = [k for k in report.fresh if _is_backbone(k)]
    if missing:
        raise ValueError(f"{path} lacks backbone tensors for {_summarise(missing)}; is it a "
                         "timm / DeiT / DINO / DINOv2 ViT checkpoint?")
    result = model.load_state_dict(converted, strict=False)
    if sorted(result.missing_keys) != sorted(report.fresh) or result.unexpected_keys:
        raise RuntimeError(f"Loading {path} left {result.missing_keys} unset and did not use "
                           f"{result.unexpected_keys}")
    return report


def _is_backbone(key: str) -> bool:
    """Model keys that a conversion must fill (everything but head and gates)."""
    if key in ("pos_embed", "cls_token", "reg_token") or key.startswith(("patch_embed.",
                                                                           "norm.")):
        return True
    match = re.match(r"blocks\.\d+\.(.+)$", key)
    return bool(match) and match[1] in _BLOCK_KEYS
