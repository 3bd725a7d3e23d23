"""FlowConfig: the shape of GCAFlow's normalizing flow, declared and validated in one place.

``GCAFlow`` builds it from its flat keyword arguments (which anomalib's CLI and checkpoints' hyper-parameters
name), and ``GCAFlowModel`` and ``MultiScaleFlow`` take it as it is.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from anomalib_gcaflow.model.flow.attention import ATTENTIONS
from anomalib_gcaflow.model.flow.subnets import ACTIVATIONS, SUBNETS


@dataclass(frozen=True)
class FlowConfig:
    """Options that shape the flow: depth per scale, subnets, fusion attention, positional condition, start.

    Args:
        depths (Sequence[int], optional): H-Flow blocks per scale, one positive count per backbone stage; kept as a
            tuple of ints. Defaults to ``(2, 5, 8)``, the paper's.
        kernel_size (int, optional): Spatial kernel of the hierarchical subnet, odd (3, 5, 7 in the paper).
            Defaults to 5.
        expansion (int, optional): Hidden-width factor alpha of the hierarchical subnet, an integer >= 1 (1-4 in
            the paper). Defaults to 4.
        attention (str, optional): Channel attention in the fusion subnets: ``"gca"``, ``"eca"``, ``"se"`` or
            ``"none"``. Defaults to ``"gca"``.
        subnet (str | Sequence[str], optional): Coupling subnet of the parallel blocks: ``"hierarchical"`` (H-Flow)
            or ``"msflow"`` (MSFlow's 3x3-LN-ReLU-3x3), one name for every scale or one per scale, finest first
            (e.g. ``("hierarchical", "hierarchical", "msflow")``); kept as one name per scale.
            Defaults to ``"hierarchical"``.
        pos_embed_dim (int, optional): Channels of the positional-encoding condition, a multiple of 4.
            Defaults to 64.
        clamp (float, optional): Log-scale bound of every coupling, positive. Defaults to 1.9.
        activation (str, optional): Activation of the hierarchical subnet, ``"gelu"`` or ``"relu"``.
            Defaults to ``"gelu"``.
        fold_positional (bool, optional): Fold the positional encoding's convolution out of the per-image work
            (exact; see ``PositionalConv2d``). Defaults to ``True``.
        data_init (bool, optional): Start from the data, as Glow does: an ``ActNorm`` at each scale's entry, set
            from the first training batch, and every coupling's output layer at zero, so the untrained flow is
            exactly that standardisation and the first epoch already yields useful likelihoods. ``False`` builds
            the paper's flow with MSFlow's initialisation (and its parameter count). Defaults to ``True``.

    Raises:
        ValueError: If any option is out of its range; the message names every such option and its accepted values.
    """

    depths: Sequence[int] = (2, 5, 8)
    kernel_size: int = 5
    expansion: int = 4
    attention: str = "gca"
    subnet: str | Sequence[str] = "hierarchical"
    pos_embed_dim: int = 64
    clamp: float = 1.9
    activation: str = "gelu"
    fold_positional: bool = True
    data_init: bool = True

    def __post_init__(self) -> None:
        """Store ``depths`` and ``subnet`` as one tuple entry per scale and reject out-of-range options."""
        object.__setattr__(self, "depths", tuple(int(depth) for depth in self.depths))
        subnets = (self.subnet,) * len(self.depths) if isinstance(self.subnet, str) else tuple(self.subnet)
        object.__setattr__(self, "subnet", subnets)
        problems = []
        if not self.depths or any(depth < 1 for depth in self.depths):
            problems.append(f"depths must give a positive block count per scale, got {list(self.depths)}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            problems.append(f"kernel_size must be odd and positive (3, 5 or 7 in the paper), got {self.kernel_size}")
        if int(self.expansion) != self.expansion or self.expansion < 1:
            problems.append(f"expansion must be an integer >= 1 (1-4 in the paper), got {self.expansion}")
        if self.attention not in ATTENTIONS:
            problems.append(f"attention must be one of {sorted(ATTENTIONS)}, got {self.attention!r}")
        if len(subnets) != len(self.depths) or any(name not in SUBNETS for name in subnets):
            problems.append(
                f"subnet must be one of {list(SUBNETS)} or a list of them with one per scale ({len(self.depths)} "
                f"scales), got {list(subnets)}"
            )
        if self.pos_embed_dim < 4 or self.pos_embed_dim % 4:
            problems.append(f"pos_embed_dim must be a positive multiple of 4, got {self.pos_embed_dim}")
        if not self.clamp > 0:
            problems.append(f"clamp must be positive, got {self.clamp}")
        if self.activation not in ACTIVATIONS:
            problems.append(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if problems:
            raise ValueError("invalid flow configuration: " + "; ".join(problems))
