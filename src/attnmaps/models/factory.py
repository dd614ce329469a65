"""The one place a model is built from a config (as timm's ``create_model``), and the metadata
that lets a checkpoint rebuild its model from the weights file alone.

Example:
    >>> from attnmaps.config import ModelConfig
    >>> model = create_model(ModelConfig(img_size=[32, 32], patch_size=8, embed_dim=32, depth=2,
    ...                                  num_heads=2), num_classes=3)
    >>> model.num_classes
    3
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from safetensors import safe_open

from ..checkpoint import load_weights, read_metadata
from ..config import ModelConfig, section_from_dict
from ..progress import logger
from .convert import load_pretrained
from .vit import ClassTokenViT

FORMAT = "attnmaps.ClassTokenViT"
# Keys that only attnmaps' own layout has: the class tokens of checkpoints written before the
# timm names, the head gates, the per-token head.
_OWN_KEYS = ("cls_tokens", "head_weight")


def create_model(cfg: ModelConfig, num_classes: int,
                 init_from: str | Path | None = None) -> ClassTokenViT:
    """A :class:`ClassTokenViT` shaped by ``cfg`` for ``num_classes`` classes, its weights
    loaded from ``init_from`` when given (see :func:`load_init_weights`)."""
    model = ClassTokenViT(
        num_classes=num_classes, in_chans=cfg.in_chans, img_size=cfg.img_size,
        patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
        num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
        drop_path=cfg.drop_path, num_registers=cfg.num_registers, head=cfg.head, stem=cfg.stem,
        stem_convs_per_stage=cfg.stem_convs_per_stage,
        gates=cfg.gates, gate_temperature=cfg.gate_temperature, mask_rate=cfg.mask_rate,
        class_blocks=cfg.class_blocks, grad_checkpointing=cfg.grad_checkpointing,
        attention_kernel=cfg.attention_kernel, patch_head=cfg.patch_head,
    )
    if init_from:
        load_init_weights(model, init_from, cfg)
    return model


def is_attnmaps_checkpoint(path: str | Path) -> bool:
    """True for a ``.safetensors`` file in attnmaps' own key layout (loaded as it is); False for
    foreign checkpoints (converted by :func:`~attnmaps.models.convert.load_pretrained`)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return False
    if read_metadata(path).get("format") == FORMAT:
        return True
    with safe_open(path, framework="pt") as f:
        keys = list(f.keys())
    return any(key in _OWN_KEYS or ".attn.gate." in key for key in keys)


def load_init_weights(model: ClassTokenViT, path: str | Path, cfg: ModelConfig) -> None:
    """Load ``path`` into ``model``: an attnmaps checkpoint as it is, a timm / DeiT / DINO /
    DINOv2 checkpoint through :func:`~attnmaps.models.convert.load_pretrained` (its report is
    logged), with ``cfg.adapt_channels`` / ``cfg.adapt_patch_size``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.init_from={str(path)!r}: no such file")
    if is_attnmaps_checkpoint(path):
        load_weights(path, model)
        return
    report = load_pretrained(path, model, adapt_channels=cfg.adapt_channels,
                             adapt_patch_size=cfg.adapt_patch_size)
    logger.info("%s", report)


def checkpoint_metadata(cfg: ModelConfig, num_classes: int,
                        class_names: Sequence[str] | None = None) -> dict[str, str]:
    """What a weights file needs to rebuild its model alone: format, class count, class names
    and the model config (JSON strings, as safetensors metadata must be)."""
    return {"format": FORMAT, "num_classes": str(num_classes),
            "class_names": json.dumps(list(class_names) if class_names is not None else None),
            "model_config": json.dumps(dataclasses.asdict(cfg))}


def load_model(path: str | Path) -> tuple[ClassTokenViT, list[str] | None]:
    """The model of an attnmaps weights file, rebuilt from its metadata alone, and its class
    names (None when the run had none). Evaluation mode, on the CPU."""
    metadata = read_metadata(path)
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} carries no attnmaps model metadata (written before attnmaps "
                         "0.2 or by another tool); load it with its run directory's "
                         "config.yaml instead (attnmaps.pipeline.load_run)")
    cfg = section_from_dict(ModelConfig, json.loads(metadata["model_config"]), "model")
    model = create_model(cfg, int(metadata["num_classes"]))
    load_weights(path, model)
    return model.eval(), json.loads(metadata["class_names"])
