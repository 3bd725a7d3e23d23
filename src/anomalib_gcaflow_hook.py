"""Makes the bare names ``GCAFlow`` and ``MVTec`` known to the stock ``anomalib`` command (docs/plugin.md).

anomalib 2.7 has no plugin registry: jsonargparse resolves ``--model GCAFlow`` only among imported subclasses,
and ``anomalib.models.get_model`` (``anomalib benchmark``) looks names up in :mod:`anomalib.models`. So
``anomalib_gcaflow_plugin.pth``, which setup.py installs into site-packages, calls :func:`install` at every
interpreter start. It puts one finder at the front of ``sys.meta_path`` and imports nothing. The finder lets
every module pass but four; once one of those has executed, it patches anomalib:

* ``anomalib.data``: :func:`alias_mvtec` adds ``MVTec``, the name ``MVTecAD`` had before anomalib 2.0;
* ``anomalib.models``: imports ``anomalib_gcaflow``, unless that is importing already;
* ``anomalib_gcaflow``: :func:`register` adds ``GCAFlow`` to :mod:`anomalib.models`;
* ``anomalib.cli.cli``: :func:`seed_cli_runs` makes ``seed_everything`` seed, which anomalib 2.7's CLI parses but
  never applies (torch seeds itself randomly at start-up, so every run started from other weights).

stdlib only on purpose: ``wrapt.when_imported`` does the same, but importing ``wrapt`` costs ~130 ms per start
(docs/plugin.md).
"""

import os
import sys

DISABLE_ENV = "ANOMALIB_GCAFLOW_DISABLE_PLUGIN"
_aliases = []  # keeps the alias classes alive: __subclasses__, where jsonargparse finds them, holds weak references


def alias_mvtec(data):
    """Make ``anomalib.data.MVTec`` the class ``MVTecAD`` and ``--data MVTec`` resolve to it. Idempotent.

    jsonargparse resolves a bare ``--data X`` among the imported subclasses named ``X``, and writes their import
    path into the config. A subclass named ``MVTec`` whose import path is ``anomalib.data.MVTec`` gives the config
    ``class_path: anomalib.data.MVTec``; importing that path gives ``MVTecAD`` itself, so the datamodule built is a
    plain ``MVTecAD`` (results under ``<Model>/MVTecAD/<category>``, as with ``--data MVTecAD``).

    Args:
        data: The module ``anomalib.data``.
    """
    if hasattr(data, "MVTec") or not hasattr(data, "MVTecAD"):  # done, or a newer anomalib has its own
        return
    _aliases.append(type("MVTec", (data.MVTecAD,), {"__module__": data.__name__}))
    data.MVTec = data.MVTecAD
    data.__all__.append("MVTec")


def register():
    """Add ``GCAFlow`` to :mod:`anomalib.models` and ``MVTec`` to :mod:`anomalib.data`. Idempotent.

    Returns:
        The class ``GCAFlow``.
    """
    import anomalib.data as data
    import anomalib.models as models

    from anomalib_gcaflow.model.lightning_model import GCAFlow

    alias_mvtec(data)
    models.GCAFlow = GCAFlow
    if "GCAFlow" not in models.__all__:
        models.__all__.append("GCAFlow")
    return GCAFlow


def seed_cli_runs(cli):
    """Make ``AnomalibCLI`` seed as Lightning's CLI does, before any class is instantiated. Idempotent.

    An int seeds Python, NumPy and torch and, through Lightning, every data-loader worker (``workers=True``);
    ``true`` (anomalib's default) seeds with a random seed that Lightning logs; ``false`` seeds nothing. The seed
    used is written back into the config, so the run's saved ``config.yaml`` names it.

    Args:
        cli: The module ``anomalib.cli.cli``.
    """
    cli_class = getattr(cli, "AnomalibCLI", None)
    original = getattr(cli_class, "before_instantiate_classes", None)
    if original is None or getattr(original, "gcaflow_seeds", False):
        return

    def before_instantiate_classes(self):
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


def _import_package(_models):
    if "anomalib_gcaflow" not in sys.modules:  # when it is, it is importing now: it registers once it has run
        import anomalib_gcaflow  # noqa: F401 - its own post-import step registers it


_AFTER = {
    "anomalib.data": alias_mvtec,
    "anomalib.models": _import_package,
    "anomalib_gcaflow": lambda _: register(),
    "anomalib.cli.cli": seed_cli_runs,
}


class _Loader:
    """Runs the real loader, then the module's step of :data:`_AFTER`; the module keeps the real loader."""

    def __init__(self, loader, name):
        self.loader = loader
        self.name = name

    def __getattr__(self, attr):  # get_source, is_package, ... before the module runs
        return getattr(self.loader, attr)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        try:
            _AFTER[self.name](module)
        except Exception as exc:  # a plugin must not break the host's import
            msg = f"anomalib-gcaflow: patching {self.name} failed ({type(exc).__name__}: {exc}); {DISABLE_ENV}=1"
            sys.stderr.write(msg + " turns this off\n")


class _Finder:
    """Finds the modules of :data:`_AFTER` through the other finders and wraps their loaders."""

    def find_spec(self, name, path=None, target=None):
        if name not in _AFTER:
            return None
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            spec = None if finder is self or find_spec is None else find_spec(name, path, target)
            if spec is not None:
                spec.loader = _Loader(spec.loader, name)
                return spec
        return None


def install():
    """Put the finder at the front of ``sys.meta_path``, unless ``ANOMALIB_GCAFLOW_DISABLE_PLUGIN`` is set."""
    if os.environ.get(DISABLE_ENV, "") in ("", "0") and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
