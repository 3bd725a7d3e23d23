"""Preparing users' own data sets for anomalib's data modules.

The names are imported on first use: an eager import would make ``python -m anomalib_gcaflow.data.magnetic_tile``
warn that the module it runs was already imported.
"""

from importlib import import_module
from typing import Any

__all__ = ["ConversionReport", "convert_magnetic_tile"]


def __getattr__(name: str) -> Any:  # noqa: ANN401 - module attributes of any type
    """Import the public names of :mod:`anomalib_gcaflow.data.magnetic_tile` lazily.

    Args:
        name (str): Attribute looked up on this package.

    Returns:
        Any: The attribute.

    Raises:
        AttributeError: If ``name`` is not one of ``__all__``.
    """
    if name in __all__:
        return getattr(import_module("anomalib_gcaflow.data.magnetic_tile"), name)
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
