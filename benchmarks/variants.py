"""The one table of GCAFlow variants every benchmark names: ids, labels, arguments, and their ablation configs.

A variant is GCAFlow with keyword arguments over its own defaults (``kwargs``), optionally at another input size
or on another backbone than the benchmark's protocol (``image_size``, ``backbone``: the benchmark builds the input
pipeline and the shared backbone for them). ``configs/ablations/<name>.yaml`` files are the CLI form of the same
variants; ``tests/test_benchmark_variants.py`` checks that the two agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class Variant:
    """One GCAFlow variant.

    Args:
        id: Short id used on command lines and in result files.
        label: Human-readable name for reports.
        kwargs: GCAFlow keyword arguments over its defaults.
        ablation_configs: Files under ``configs/ablations/`` whose ``init_args`` give exactly this variant.
        image_size: Square input size replacing the benchmark's (``None``: the benchmark's).
        backbone: Backbone replacing the benchmark's (``None``: the benchmark's).
        in_accuracy_grid: Part of the accuracy benchmark's default grid.
    """

    id: str
    label: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    ablation_configs: tuple[str, ...] = ()
    image_size: int | None = None
    backbone: str | None = None
    in_accuracy_grid: bool = True

    def __post_init__(self) -> None:
        """Freeze ``kwargs``: the registry is shared by every benchmark in the process."""
        object.__setattr__(self, "kwargs", MappingProxyType(dict(self.kwargs)))


MSFLOW_EQUIVALENT: Mapping[str, Any] = MappingProxyType({"subnet": "msflow", "attention": "none"})

_VARIANTS = (
    Variant(
        "gcaflow",
        "GCAFlow (paper defaults)",
        ablation_configs=("attention_gca.yaml", "kernel5.yaml", "expansion4.yaml"),
    ),
    Variant(
        "msflow_equiv",
        "MSFlow-equivalent (MSFlow subnet, no attention)",
        MSFLOW_EQUIVALENT,
        ablation_configs=("msflow.yaml",),
    ),
    Variant(
        "msflow_gca",
        "MSFlow subnet with GCA attention",
        {"subnet": "msflow"},
        in_accuracy_grid=False,
    ),
    Variant(
        "gcaflow_coarse_msflow",
        "GCAFlow, MSFlow's subnet on the coarsest scale",
        {"subnet": ("hierarchical", "hierarchical", "msflow")},
        ("coarse_msflow.yaml",),
        in_accuracy_grid=False,
    ),
    Variant("gcaflow_se", "GCAFlow, SE attention", {"attention": "se"}, ("attention_se.yaml",)),
    Variant("gcaflow_eca", "GCAFlow, ECA attention", {"attention": "eca"}, ("attention_eca.yaml",)),
    Variant("gcaflow_noattn", "GCAFlow, no attention (H-Flow only)", {"attention": "none"}, ("attention_none.yaml",)),
    Variant("gcaflow_k3", "GCAFlow, kernel 3", {"kernel_size": 3}, ("kernel3.yaml",)),
    Variant("gcaflow_k7", "GCAFlow, kernel 7", {"kernel_size": 7}, ("kernel7.yaml",)),
    Variant("gcaflow_alpha1", "GCAFlow, alpha 1", {"expansion": 1}, ("expansion1.yaml",)),
    Variant("gcaflow_alpha2", "GCAFlow, alpha 2", {"expansion": 2}, ("expansion2.yaml",), in_accuracy_grid=False),
    Variant("gcaflow_alpha3", "GCAFlow, alpha 3", {"expansion": 3}, ("expansion3.yaml",), in_accuracy_grid=False),
    Variant(
        "gcaflow_pe16",
        "GCAFlow, 16-channel positional encoding",
        {"pos_embed_dim": 16},
        in_accuracy_grid=False,
    ),
    Variant(
        "gcaflow_noise",
        "GCAFlow, feature noise 0.1",
        {"feature_noise": 0.1},
        ("feature_noise.yaml",),
        in_accuracy_grid=False,
    ),
    Variant(
        "gcaflow_paper_init",
        "GCAFlow, paper's initialisation (no data_init)",
        {"data_init": False},
        ("paper_init.yaml",),
        in_accuracy_grid=False,
    ),
    Variant("gcaflow_512", "GCAFlow at 512x512", image_size=512, in_accuracy_grid=False),
    Variant("gcaflow_lite2", "GCAFlow on EfficientNet-Lite2", backbone="tf_efficientnet_lite2", in_accuracy_grid=False),
)

VARIANTS: Mapping[str, Variant] = MappingProxyType({variant.id: variant for variant in _VARIANTS})
ACCURACY_GRID: tuple[str, ...] = tuple(variant.id for variant in _VARIANTS if variant.in_accuracy_grid)


def variant(name: str) -> Variant:
    """Look a variant up by id.

    Args:
        name: Variant id.

    Returns:
        Variant: The variant.

    Raises:
        ValueError: For an unknown id, naming the known ones.
    """
    if name not in VARIANTS:
        msg = f"Unknown GCAFlow variant {name!r}; choose from {', '.join(VARIANTS)}."
        raise ValueError(msg)
    return VARIANTS[name]
