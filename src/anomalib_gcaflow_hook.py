"""anomalib-gcaflow start-up hook, run by anomalib_gcaflow_plugin.pth in every interpreter. See docs/plugin.md."""

# Kept small and stdlib-only on purpose: it is imported at EVERY Python start-up of the environment (compiling
# it from source would cost ~1 ms; editable installs therefore get a byte-compiled copy, see setup.py). It only
# wraps the loader of watched modules; the work is in anomalib_gcaflow_hook_impl, imported once one has loaded.
import os
import sys

DISABLE_ENV = "ANOMALIB_GCAFLOW_DISABLE_PLUGIN"
WATCHED = ("anomalib.data", "anomalib.models", "anomalib_gcaflow", "anomalib.cli.cli")
_callbacks = {}  # module name -> [callback(module)], run once the module has executed
_executing = set()  # watched modules whose code is running now
_finding = set()
_finder = None


def is_disabled():
    return os.environ.get(DISABLE_ENV, "").strip() not in ("", "0")


def warn(what, exc):
    msg = f"{what} failed ({type(exc).__name__}: {exc}); continuing without it ({DISABLE_ENV}=1 turns this off)"
    sys.stderr.write(f"anomalib-gcaflow: {msg}\n")


def _call(name, callback, module):
    try:
        callback(module)
    except Exception as exc:  # a plugin must never break the host import
        warn(f"post-import hook for {name}", exc)


def _exec_and_notify(exec_module, name):
    def exec_and_notify(module):
        if getattr(module, "__name__", None) != name:  # a loader shared by several modules
            return exec_module(module)
        _executing.add(name)
        try:
            exec_module(module)
        finally:
            _executing.discard(name)
        module = sys.modules.get(name, module)
        parent, _, child = name.rpartition(".")
        if parent in sys.modules:  # importlib binds parent.child only later: callbacks need it now
            try:
                setattr(sys.modules[parent], child, module)
            except (AttributeError, TypeError):
                pass
        for callback in list(_callbacks.get(name, ())):
            _call(name, callback, module)

    return exec_and_notify


class _PostImportFinder:
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _callbacks or fullname in _finding:
            return None
        _finding.add(fullname)
        try:
            for finder in sys.meta_path:  # the finders behind us find the real spec
                find_spec = getattr(finder, "find_spec", None)
                spec = None if finder is self or find_spec is None else find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            _finding.discard(fullname)
        exec_module = getattr(spec.loader, "exec_module", None)
        if exec_module is not None:
            try:  # patch this (per-module) loader instance: __loader__ keeps its genuine type
                spec.loader.exec_module = _exec_and_notify(exec_module, fullname)
            except (AttributeError, TypeError):  # e.g. __slots__: wrap it instead
                from anomalib_gcaflow_hook_impl import LoaderProxy

                spec.loader = LoaderProxy(spec.loader, _exec_and_notify(exec_module, fullname))
        return spec

    def invalidate_caches(self):
        pass


def loaded(name):
    """Imported and not executing now (exact for WATCHED and other when_imported names)."""
    return name in sys.modules and name not in _executing


def when_imported(name, callback):
    """Run callback(module) after module `name` has executed; now, if it is already imported."""
    _callbacks.setdefault(name, []).append(callback)
    module = sys.modules.get(name)
    if loaded(name) and not getattr(getattr(module, "__spec__", None), "_initializing", False):
        _call(name, callback, module)


def _on_watched(module):
    import anomalib_gcaflow_hook_impl

    anomalib_gcaflow_hook_impl.on_imported(module)


def installed():
    return _finder is not None and _finder in sys.meta_path


def install(force=False):
    """Install the post-import finder (idempotent); False when ANOMALIB_GCAFLOW_DISABLE_PLUGIN is set."""
    global _finder
    if is_disabled() and not force:
        return False
    if not installed():
        _finder = _PostImportFinder()
        sys.meta_path.insert(0, _finder)
        for name in WATCHED:
            if _on_watched not in _callbacks.get(name, ()):
                when_imported(name, _on_watched)
    return True
