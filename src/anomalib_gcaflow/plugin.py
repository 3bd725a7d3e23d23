"""Register GCAFlow (and the ``MVTec`` data alias) with anomalib 2.7.

anomalib 2.7 has no plugin registry or entry-point group. Two of its look-ups matter for an external model:

* the CLI (jsonargparse) resolves a bare ``--model GCAFlow`` / ``--data MVTec`` only among subclasses that are
  already imported, by class name;
* :func:`anomalib.models.get_model` (used by ``anomalib benchmark`` and the tiled ensemble) finds
  ``"GCAFlow"`` among the DIRECT subclasses of ``AnomalibModule`` and ``{"class_path": "GCAFlow"}`` as an
  attribute of :mod:`anomalib.models`.

:func:`register` satisfies both. It runs automatically in every process of an environment where the project is
installed (``anomalib_gcaflow_plugin.pth`` -> :mod:`anomalib_gcaflow_hook`, as soon as ``anomalib.models`` has
been imported), and ``python -m anomalib_gcaflow`` calls it explicitly. See ``docs/plugin.md``.
"""

from __future__ import annotations

import warnings

__all__ = ["register"]


def register() -> type:
    """Attach ``GCAFlow`` to :mod:`anomalib.models` and ``MVTec`` to :mod:`anomalib.data`. Idempotent.

    Returns:
        The ``GCAFlow`` class.
    """
    import anomalib.data
    import anomalib.models
    from anomalib.models.components import AnomalibModule

    from anomalib_gcaflow_hook_impl import alias_data_modules

    alias_data_modules(anomalib.data)

    from anomalib_gcaflow.lightning_model import GCAFlow  # lazy: pulls in torch and the model code

    if getattr(anomalib.models, "GCAFlow", None) is not GCAFlow:
        anomalib.models.GCAFlow = GCAFlow
    names = getattr(anomalib.models, "__all__", None)
    if isinstance(names, list) and "GCAFlow" not in names:
        names.append("GCAFlow")
    if AnomalibModule not in GCAFlow.__bases__:
        warnings.warn(
            "GCAFlow is not a direct subclass of AnomalibModule: anomalib.models.get_model('GCAFlow') will not "
            "find it by name (only {'class_path': 'GCAFlow'} works)",
            stacklevel=2,
        )
    return GCAFlow
