"""GCAFlow in anomalib's model shape: Lightning module, torch model, loss, anomaly map, and the flow beside them."""

from anomalib_gcaflow.model.flow import FlowConfig, MultiScaleFlow
from anomalib_gcaflow.model.lightning_model import GCAFlow
from anomalib_gcaflow.model.torch_model import GCAFlowModel

__all__ = ["FlowConfig", "GCAFlow", "GCAFlowModel", "MultiScaleFlow"]
