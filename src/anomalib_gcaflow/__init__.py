"""GCAFlow for anomalib: multi-scale normalizing flow with global context-aware channel attention.

Paper: Liao et al., Sensors 2025, https://doi.org/10.3390/s25103205. Credits and licences: NOTICE.
"""

from anomalib_gcaflow.flow import MultiScaleFlow
from anomalib_gcaflow.lightning_model import GCAFlow
from anomalib_gcaflow.torch_model import GCAFlowModel

__all__ = ["GCAFlow", "GCAFlowModel", "MultiScaleFlow"]
