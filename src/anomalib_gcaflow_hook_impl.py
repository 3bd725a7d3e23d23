"""What the anomalib-gcaflow start-up hook does once a watched module has been imported (see docs/plugin.md).

:mod:`anomalib_gcaflow_hook` (imported at start-up by ``anomalib_gcaflow_plugin.pth``) calls
:func:`on_imported` after each of these modules has finished executing:

* ``anomalib.data``    -> :func:`alias_data_modules` (``anomalib.data.MVTec``); touches ``anomalib.data`` only,
  so it is safe while ``anomalib.models`` is still half-imported (``anomalib.models`` imports
  ``anomalib.data`` on its way);
* ``anomalib.models``  -> :func:`register_models` -> ``anomalib_gcaflow.plugin.register()``
  (``anomalib.models.GCAFlow``);
* ``anomalib_gcaflow`` -> the same, for processes that import the package first: the package pulls in
  ``anomalib.models`` half-way through its own import, when registering would be circular;
* ``anomalib.cli.cli`` -> :func:`seed_cli_runs`: anomalib 2.7's CLI parses ``seed_everything`` but never seeds,
  and torch seeds its default generator randomly at start-up, so without this every ``anomalib train`` started
  from different weights whatever the configured seed.

This module is stdlib-only as well (a top-level module, not part of the ``anomalib_gcaflow`` package, whose
``__init__`` imports torch and anomalib). Failures never break the host import: one line goes to stderr.
"""

from __future__ import annotations

import sys

import anomalib_gcaflow_hook as hook

#: bare names added to ``anomalib.data`` -> the anomalib 2.7 class they stand for
DATA_ALIASES = {"MVTec": "MVTecAD"}

_alias_markers: list[type] = []  # strong references: ``__subclasses__`` only holds weak ones
_registering = False
_models_state: str | None = None  # None: not yet; "ok": registered; "failed": warned once, never retried


def on_imported(module) -> None:
    """Dispatch for :data:`anomalib_gcaflow_hook.WATCHED`."""
    if module.__name__ == "anomalib.data":
        alias_data_modules(module)
    elif module.__name__ == "anomalib.cli.cli":
        seed_cli_runs(module)
    else:
        register_models()


def alias_data_modules(data_module) -> None:
    """Make ``MVTec`` an alias of ``MVTecAD`` for ``get_datamodule`` and for the CLI's ``--data MVTec``.

    ``anomalib.data.MVTec`` is set to ``MVTecAD`` itself (``get_datamodule({"class_path": "MVTec"})`` looks the
    name up as an attribute). jsonargparse resolves a bare ``--data X`` only among the *names of imported
    subclasses*, so a marker subclass named ``MVTec`` whose import path is ``anomalib.data.MVTec`` is created
    too: the parsed config says ``class_path: anomalib.data.MVTec``, and importing that path gives ``MVTecAD``,
    so the instantiated datamodule IS an ``MVTecAD`` (results under ``<Model>/MVTecAD/<category>``, exactly as
    with ``--data MVTecAD``). Calling the marker directly also returns an ``MVTecAD``. Idempotent; does nothing
    if anomalib itself defines ``MVTec`` again.
    """
    for alias, target_name in DATA_ALIASES.items():
        target = getattr(data_module, target_name, None)
        if target is None or hasattr(data_module, alias):  # unknown anomalib, or anomalib has the name itself
            continue
        marker = type(
            alias,
            (target,),
            {
                "__module__": data_module.__name__,
                "__qualname__": alias,
                "__doc__": f"Alias of :class:`{data_module.__name__}.{target_name}` (added by anomalib-gcaflow).",
                "__new__": _alias_new(target),
            },
        )
        setattr(data_module, alias, target)
        _alias_markers.append(marker)
        names = getattr(data_module, "__all__", None)
        if isinstance(names, list) and alias not in names:
            names.append(alias)


class LoaderProxy:
    """Stands in for a loader that refuses the hook's instance attribute: delegates all but ``exec_module``."""

    def __init__(self, loader, exec_module) -> None:
        self._loader = loader
        self.exec_module = exec_module

    def create_module(self, spec):
        create = getattr(self._loader, "create_module", None)
        return None if create is None else create(spec)

    def __getattr__(self, name: str):
        return getattr(self._loader, name)


def _alias_new(target: type):
    def __new__(cls, *args, **kwargs):  # noqa: ARG001, N807
        return target(*args, **kwargs)

    return staticmethod(__new__)


def register_models() -> None:
    """Run ``anomalib_gcaflow.plugin.register()`` once ``anomalib.models`` and the package are both importable."""
    global _registering, _models_state
    if _models_state == "failed" or _registering or not hook.loaded("anomalib.models"):
        return
    if "anomalib_gcaflow" in sys.modules and not hook.loaded("anomalib_gcaflow"):
        return  # the package is mid-import: its own post-import callback comes back here
    _registering = True
    try:
        from anomalib_gcaflow.plugin import register

        register()  # idempotent: also cheap again after importlib.reload(anomalib.models)
        _models_state = "ok"
    except Exception as exc:  # never break ``import anomalib.models``
        _models_state = "failed"
        hook.warn("registering GCAFlow with anomalib", exc)
    finally:
        _registering = False


def seed_cli_runs(cli_module) -> None:
    """Make anomalib's CLI honour ``seed_everything`` as Lightning's CLI does, before any class is instantiated.

    An int seeds Python, NumPy and torch with it and makes Lightning seed every data-loader worker from it
    (``workers=True``); ``true`` (anomalib's default) seeds with a random seed that Lightning logs; ``false``
    leaves the generators alone. The seed used is written back into the config, so the ``config.yaml`` saved
    with the run names it. Idempotent; does nothing if anomalib renames the hook it wraps.
    """
    cli_class = getattr(cli_module, "AnomalibCLI", None)
    original = getattr(cli_class, "before_instantiate_classes", None)
    if original is None or getattr(original, "gcaflow_seeds", False):
        return

    def before_instantiate_classes(self) -> None:
        original(self)
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else None
        seed = None if config is None else config.get("seed_everything")
        if seed is None or seed is False:
            return
        from lightning.pytorch import seed_everything

        config["seed_everything"] = seed_everything(None if seed is True else seed, workers=True)

    before_instantiate_classes.gcaflow_seeds = True
    cli_class.before_instantiate_classes = before_instantiate_classes
