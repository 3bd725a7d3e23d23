"""GCAFlow for anomalib: multi-scale normalizing flow with global context-aware channel attention.

Paper: Liao et al., Sensors 2025, https://doi.org/10.3390/s25103205. Credits and licences: NOTICE.
"""

from anomalib_gcaflow.model import FlowConfig, GCAFlow, GCAFlowModel, MultiScaleFlow

__all__ = ["FlowConfig", "GCAFlow", "GCAFlowModel", "MultiScaleFlow"]
