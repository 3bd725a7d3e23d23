"""The one set of frozen backbone weights every model of the accuracy and convergence benchmarks gets."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import save_file
from torch import nn

from anomalib_gcaflow.model.backbones import build_backbone
from benchmarks.protocol import Protocol

_ALL_LAYERS = ("layer1", "layer2", "layer3", "layer4")


class SharedBackbone:
    """The one set of backbone weights every model gets, loaded strictly once and checked in every model.

    GCAFlow and Fastflow build it with :func:`build_backbone` (a frozen ``FeaturePyramid``). Cflow and PatchCore
    build their extractor from a timm name, so they get ``local-dir:<folder>``, a timm model folder written from the
    strictly loaded weights. timm loads such a folder non-strictly when ``features_only`` is set, so every model's
    extractor is compared tensor by tensor with the reference after construction.

    Args:
        protocol: The protocol (backbone name and weights file).
        work_dir: Scratch folder for the timm model folder.
    """

    def __init__(self, protocol: Protocol, work_dir: Path) -> None:
        self.name = protocol.backbone
        self.weights_path = protocol.weights_path
        # All four stride stages, so that every model's layer choice is covered by the reference.
        self.reference = build_backbone(self.name, weights_path=self.weights_path, layers=_ALL_LAYERS)
        self.state = {key: value.detach().clone() for key, value in self.reference.extractor.state_dict().items()}
        self.module_names = dict(zip(_ALL_LAYERS, self.reference.extractor.feature_info.module_name(), strict=True))
        self.channels = dict(zip(_ALL_LAYERS, self.reference.channels, strict=True))
        self.strides = dict(zip(_ALL_LAYERS, self.reference.strides, strict=True))
        self.digest = _tensor_digest(self.state)
        self.folder = self._materialise(work_dir)

    def timm_name(self) -> str:
        """Return the timm model name that loads the shared weights (``local-dir:<folder>``).

        Returns:
            str: The name.
        """
        return f"local-dir:{self.folder}"

    def check(self, extractor: nn.Module, what: str) -> None:
        """Fail unless every tensor of ``extractor`` equals the reference's tensor of the same name.

        Args:
            extractor: A timm features model (or its wrapper) holding backbone weights.
            what: Description of the extractor, for the error message.
        """
        state = {k: v for k, v in extractor.state_dict().items() if not k.endswith("num_batches_tracked")}
        unknown = [key for key in state if key not in self.state]
        different = [key for key in state if key in self.state and not torch.equal(state[key].cpu(), self.state[key])]
        if not state or unknown or different:
            msg = (
                f"{what} does not hold the shared {self.name!r} weights ({len(unknown)} unknown and "
                f"{len(different)} different tensors, e.g. {(unknown + different)[:3]}); the comparison would not be "
                f"on one backbone. Delete {self.folder} and rerun."
            )
            raise RuntimeError(msg)

    def describe(self) -> dict[str, Any]:
        """Describe the shared backbone for the records.

        Returns:
            dict[str, Any]: Name, weights source and digest, stage names, channels and strides.
        """
        return {
            "name": self.name,
            "weights_path": self.weights_path,
            "weights_sha256_12": self.digest,
            "timm_folder": str(self.folder),
            "stages": {
                layer: {
                    "module": self.module_names[layer],
                    "channels": self.channels[layer],
                    "stride": self.strides[layer],
                }
                for layer in _ALL_LAYERS
            },
            "mean_std": [list(self.reference.mean), list(self.reference.std)],
        }

    def _materialise(self, work_dir: Path) -> Path:
        """Write (once) the timm folder: ``config.json`` with the input statistics, and ``model.safetensors``.

        Args:
            work_dir: Scratch folder.

        Returns:
            Path: The folder.
        """
        folder = work_dir / "backbones" / f"{self.name}-{self.digest}"
        # anomalib's TimmFeatureExtractor switches to its transformer path for any name containing "vit".
        if "vit" in str(folder).lower():
            msg = (
                f"The backbone folder {folder} contains 'vit', which anomalib reads as a ViT; pass another --work-dir."
            )
            raise ValueError(msg)
        weights = folder / "model.safetensors"
        if not weights.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            config = timm.get_pretrained_cfg(self.name).to_dict()
            for key in ("url", "hf_hub_id", "tag"):
                config.pop(key, None)
            config.update(mean=list(self.reference.mean), std=list(self.reference.std))
            (folder / "config.json").write_text(
                json.dumps({"architecture": self.name, "num_classes": config["num_classes"], "pretrained_cfg": config}),
            )
            partial = folder / "model.safetensors.partial"
            save_file({key: value.contiguous() for key, value in self.state.items()}, str(partial))
            partial.replace(weights)
        return folder


def _tensor_digest(state: dict[str, torch.Tensor]) -> str:
    """Hash a state dict's names and values.

    Args:
        state: The state dict.

    Returns:
        str: The first 12 hexadecimal characters of its SHA-256.
    """
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]
