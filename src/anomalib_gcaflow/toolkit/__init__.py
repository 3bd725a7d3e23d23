"""Training toolkit for any anomalib model: data checks, last-epoch checkpoint, distributed evaluation, feature cache.

One call attaches the guards to any anomalib model, through anomalib's ``Engine``:

.. code-block:: python

    from anomalib.engine import Engine
    from anomalib.models import Padim

    from anomalib_gcaflow.toolkit import training_callbacks

    engine = Engine(callbacks=training_callbacks())
    engine.fit(Padim(), datamodule=datamodule)

A model that keeps a :class:`FeatureCache` in its ``feature_cache`` attribute (as GCAFlow does) also stops re-reading
the training images whose features are cached; other models are left alone by that callback.

:class:`RetainFreedMemory` is opt-in (the quick-start config adds it): it changes how the whole process's C
allocator returns memory, which a library should not do unasked.
"""

from collections.abc import Sequence

from lightning.pytorch import Callback

from anomalib_gcaflow.toolkit.allocator import RetainFreedMemory, retain_freed_memory
from anomalib_gcaflow.toolkit.callbacks import (
    DataCheck,
    DistributedEvaluation,
    LastEpochCheckpoint,
    SkipCachedImageReads,
)
from anomalib_gcaflow.toolkit.feature_cache import CachedImagePlaceholders, FeatureCache

__all__ = [
    "CachedImagePlaceholders",
    "DataCheck",
    "DistributedEvaluation",
    "FeatureCache",
    "LastEpochCheckpoint",
    "RetainFreedMemory",
    "SkipCachedImageReads",
    "retain_freed_memory",
    "training_callbacks",
]


def training_callbacks(model_callbacks: Sequence[Callback] = ()) -> list[Callback]:
    """Return the toolkit's callbacks in the order they must run, around the model's own.

    ``SkipCachedImageReads`` comes first, so that it sees training batches before anomalib's pre-processor (one
    of the model's callbacks) transforms them; ``DataCheck``, ``LastEpochCheckpoint`` and ``DistributedEvaluation``
    follow. Given to ``Engine(callbacks=...)`` or ``Trainer(callbacks=...)`` they precede the model's callbacks
    already, as Lightning puts the trainer's callbacks before the model's.

    Args:
        model_callbacks (Sequence[Callback], optional): The model's own callbacks (``configure_callbacks``), to be
            placed between the first and the other toolkit callbacks. Defaults to ``()``.

    Returns:
        list[Callback]: ``[SkipCachedImageReads, *model_callbacks, DataCheck, LastEpochCheckpoint,
        DistributedEvaluation]``.
    """
    return [SkipCachedImageReads(), *model_callbacks, DataCheck(), LastEpochCheckpoint(), DistributedEvaluation()]
