"""The second-stage networks, and the metadata that rebuilds one from its weights file alone.

``segment.arch=vit_mlp`` (built in): the stage-1 :class:`~attnmaps.models.vit.ClassTokenViT`,
initialised from the stage-1 weights, whose patch tokens from ``segment.blocks`` feed an
:class:`~attnmaps.segment.decoder.AllMLPDecoder`; the class tokens still run in the encoder (the
features are those stage 1 learned) but the decoder reads only the patch tokens.
``segment.arch=smp`` (``pip install "attnmaps[smp]"``): segmentation_models_pytorch's
``segment.smp_arch`` (DeepLabV3Plus, Unet, FPN, ...) with encoder ``segment.smp_encoder``, its
weights read from the local file ``segment.smp_encoder_weights`` (never downloaded).

Example:
    >>> from attnmaps.config import ModelConfig, SegmentConfig
    >>> model_cfg = ModelConfig(img_size=[32, 32], patch_size=8, embed_dim=16, depth=2,
    ...                         num_heads=2)
    >>> net = create_segmenter(model_cfg, SegmentConfig(decoder_dim=8, low_level_dim=4),
    ...                        num_classes=2, num_labels=3)
    >>> net(torch.randn(1, 3, 32, 48)).shape
    torch.Size([1, 3, 32, 48])
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoint import load_weights, read_metadata
from ..config import ModelConfig, SegmentConfig, section_from_dict
from ..models.factory import create_model
from ..models.vit import ClassTokenViT, parse_attn_blocks
from .decoder import AllMLPDecoder

FORMAT = "attnmaps.Segmenter"
SMP_HINT = 'segment.arch=smp needs segmentation_models_pytorch: pip install "attnmaps[smp]"'
SMP_OUTPUT_STRIDE = 32


class SegmentationViT(nn.Module):
    """A ClassTokenViT encoder (``backbone``) with an all-MLP decoder over the patch tokens of
    the blocks ``blocks``; ``forward(images [B,C,H,W]) -> logits [B,L,H,W]`` for H, W divisible
    by the patch size (``size_multiple``)."""

    def __init__(self, backbone: ClassTokenViT, blocks: Sequence[int], num_labels: int,
                 seg: SegmentConfig):
        super().__init__()
        self.backbone = backbone
        self.blocks = list(blocks)
        self.size_multiple = backbone.patch_size
        self.decoder = AllMLPDecoder(backbone.norm.normalized_shape[0], len(self.blocks),
                                     num_labels, seg.decoder_dim, backbone.in_chans,
                                     seg.low_level_dim, seg.dropout)

    def forward(self, images: Tensor) -> Tensor:
        out = self.backbone.forward_features(images, patch_blocks=self.blocks)
        return self.decoder(out["blocks"], out["grid"], images)


class SMPSegmenter(nn.Module):
    """A segmentation_models_pytorch network, with the input size multiple it needs."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.size_multiple = SMP_OUTPUT_STRIDE

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)


def build_smp(seg: SegmentConfig, in_chans: int, num_labels: int) -> SMPSegmenter:
    """``seg.smp_arch`` with encoder ``seg.smp_encoder``; encoder weights from the local file
    ``seg.smp_encoder_weights`` when set (a state dict, ``.pth``/``.pt`` or ``.safetensors``)."""
    try:
        import segmentation_models_pytorch as smp
    except ImportError as error:  # also raised when torchvision does not load
        raise ImportError(f"{SMP_HINT} ({error})") from None
    net = smp.create_model(seg.smp_arch, encoder_name=seg.smp_encoder, encoder_weights=None,
                           in_channels=in_chans, classes=num_labels)
    if seg.smp_encoder_weights:
        net.encoder.load_state_dict(read_state_dict(Path(seg.smp_encoder_weights)))
    return SMPSegmenter(net)


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """A state dict from a local ``.safetensors`` or ``torch.save`` file (``weights_only``)."""
    if not path.is_file():
        raise FileNotFoundError(f"segment.smp_encoder_weights={str(path)!r}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state)


def create_segmenter(model_cfg: ModelConfig, seg: SegmentConfig, num_classes: int,
                     num_labels: int, init_from: str | Path | None = None) -> nn.Module:
    """The second-stage network for ``num_labels`` mask labels. ``vit_mlp``: a ClassTokenViT
    shaped by ``model_cfg`` for the stage-1 ``num_classes``, loaded from ``init_from`` (the
    stage-1 weights) when given."""
    if seg.arch == "smp":
        return build_smp(seg, model_cfg.in_chans, num_labels)
    backbone = create_model(dataclasses.replace(model_cfg, init_from=None), num_classes,
                            init_from=init_from)
    return SegmentationViT(backbone, decoder_blocks(backbone, seg.blocks), num_labels, seg)


def decoder_blocks(backbone: ClassTokenViT, spec: str) -> list[int]:
    """Indices of the blocks ``spec`` names among those that update the patch tokens (all but
    the class-attention blocks)."""
    depth = len(backbone.blocks) - backbone.class_blocks
    if depth < 1:
        raise ValueError("segment.arch=vit_mlp reads patch tokens, but every block of this "
                         f"model is a class-attention block (model.class_blocks="
                         f"{backbone.class_blocks})")
    return parse_attn_blocks(spec, depth)


def segmenter_metadata(model_cfg: ModelConfig, seg: SegmentConfig, num_classes: int,
                       num_labels: int, class_names: Sequence[str] | None) -> dict[str, str]:
    """What :func:`load_segmenter` needs (safetensors metadata strings)."""
    return {"format": FORMAT, "num_classes": str(num_classes), "num_labels": str(num_labels),
            "class_names": json.dumps(list(class_names) if class_names is not None else None),
            "model_config": json.dumps(dataclasses.asdict(model_cfg)),
            "segment_config": json.dumps(dataclasses.asdict(seg))}


def is_segmenter(path: str | Path) -> bool:
    """Whether ``path`` is a second-stage weights file written by attnmaps."""
    return read_metadata(path).get("format") == FORMAT


def load_segmenter(path: str | Path) -> tuple[nn.Module, SegmentConfig, list[str] | None]:
    """The network of a second-stage weights file, its ``segment`` config and class names
    (evaluation mode, CPU)."""
    metadata = read_metadata(path)
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a second-stage (attnmaps segment) weights file")
    model_cfg = section_from_dict(ModelConfig, json.loads(metadata["model_config"]), "model")
    seg = section_from_dict(SegmentConfig, json.loads(metadata["segment_config"]), "segment")
    net = create_segmenter(model_cfg, seg, int(metadata["num_classes"]),
                           int(metadata["num_labels"]))
    load_weights(path, net)
    return net.eval(), seg, json.loads(metadata["class_names"])
