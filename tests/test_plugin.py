"""The anomalib plugin mechanism (docs/plugin.md), always checked in fresh interpreters.

Most tests need the project INSTALLED in the interpreter running pytest (``pip install -e .`` or
``pip install .``): they check what ``anomalib_gcaflow_plugin.pth`` does at start-up. They are skipped when the
distribution is not installed at all, and fail when it is installed without its ``.pth`` file.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

DISABLE = "ANOMALIB_GCAFLOW_DISABLE_PLUGIN"
PTH_NAME = "anomalib_gcaflow_plugin.pth"
SRC = Path(__file__).resolve().parents[1] / "src"
TIMEOUT = 300


def _distribution() -> importlib.metadata.Distribution | None:
    try:
        return importlib.metadata.distribution("anomalib-gcaflow")
    except importlib.metadata.PackageNotFoundError:
        return None


requires_install = pytest.mark.skipif(
    _distribution() is None,
    reason="anomalib-gcaflow is not installed in this interpreter (pip install -e .): the start-up hook is absent",
)


def _has_real_model() -> bool:
    # no import: importing anomalib_gcaflow would pull torch + anomalib into the pytest process
    spec = importlib.util.find_spec("anomalib_gcaflow")
    locations = list(spec.submodule_search_locations or []) if spec else []
    return any(Path(loc, "lightning_model.py").is_file() for loc in locations)


requires_model = pytest.mark.skipif(
    not _has_real_model(),
    reason="anomalib_gcaflow.lightning_model (the real GCAFlow) does not exist yet",
)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != DISABLE}
    env.update(HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", **extra)
    return env


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, env=_env(**env), timeout=TIMEOUT, check=False)


def _code(*parts: str) -> str:
    return "\n".join(textwrap.dedent(part) for part in parts)


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return _run([sys.executable, "-c", textwrap.dedent(code)], **env)


def _ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    return proc.stdout


def _last_json(proc: subprocess.CompletedProcess[str]) -> dict:
    return json.loads(_ok(proc).strip().splitlines()[-1])


def _anomalib_exe() -> str:
    exe = Path(sys.executable).with_name("anomalib")
    if not exe.exists():
        pytest.skip(f"no `anomalib` console script next to {sys.executable}")
    return str(exe)


def _write_stand_in(root: Path, lightning_model: str) -> dict[str, str]:
    """A stand-in ``anomalib_gcaflow`` package first on PYTHONPATH; everything but lightning_model is the real one."""
    pkg = root / "anomalib_gcaflow"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(f"__path__.append({str(SRC / 'anomalib_gcaflow')!r})\n")
    (pkg / "lightning_model.py").write_text(textwrap.dedent(lightning_model))
    return {"PYTHONPATH": os.pathsep.join([str(root), str(SRC)])}


STAND_IN_MODEL = """
    from anomalib import LearningType
    from anomalib.models.components import AnomalibModule

    class GCAFlow(AnomalibModule):
        @property
        def trainer_arguments(self):
            return {}

        @property
        def learning_type(self):
            return LearningType.ONE_CLASS
"""

# --------------------------------------------------------------------------------------------------------------
# installation and start-up


@requires_install
def test_pth_file_is_installed_with_the_distribution() -> None:
    dist = _distribution()
    files = [f for f in (dist.files or []) if f.name == PTH_NAME]
    assert files, f"{PTH_NAME} is not in the RECORD of the installed distribution (setup.py build hooks broken?)"
    pth = Path(dist.locate_file(files[0]))
    assert pth.is_file(), pth
    assert "anomalib_gcaflow_hook" in pth.read_text()


@requires_install
def test_installed_start_up_module_is_current() -> None:
    """Editable installs COPY the start-up module into site-packages (setup.py): it must match src/."""
    spec = importlib.util.find_spec("anomalib_gcaflow_hook")
    assert spec is not None and spec.origin, "anomalib_gcaflow_hook is not importable"
    source = SRC / "anomalib_gcaflow_hook.py"
    if not source.is_file():
        pytest.skip("not running from a source checkout")
    assert Path(spec.origin).read_bytes() == source.read_bytes(), (
        f"{spec.origin} differs from {source}: re-run `pip install --no-deps -e .` after editing the start-up hook"
    )


@requires_install
def test_plain_startup_imports_only_the_tiny_hook() -> None:
    info = _last_json(
        _python(
            """
            import json, sys
            print(json.dumps({
                "heavy": sorted(m for m in ("torch", "anomalib", "anomalib_gcaflow", "numpy") if m in sys.modules),
                "hook": "anomalib_gcaflow_hook" in sys.modules,
                "impl": "anomalib_gcaflow_hook_impl" in sys.modules,
                "finder": any(type(f).__name__ == "_PostImportFinder" for f in sys.meta_path),
            }))
            """,
        ),
    )
    assert info == {"heavy": [], "hook": True, "impl": False, "finder": True}


def test_hook_module_is_stdlib_only() -> None:
    # with the .pth silenced, import the hook from the source tree and see what it drags in
    new = _last_json(
        _python(
            f"""
            import json, sys
            sys.path.insert(0, {str(SRC)!r})
            before = set(sys.modules)
            import anomalib_gcaflow_hook
            anomalib_gcaflow_hook.install(force=True)
            print(json.dumps(sorted(set(sys.modules) - before)))
            """,
            **{DISABLE: "1"},
        ),
    )
    assert new == ["anomalib_gcaflow_hook"]


@requires_install
def test_disable_variable_turns_the_hook_off() -> None:
    info = _last_json(
        _python(
            """
            import json, sys
            hook = "anomalib_gcaflow_hook" in sys.modules
            import anomalib.data, anomalib.models
            print(json.dumps({
                "hook": hook,
                "model": hasattr(anomalib.models, "GCAFlow"),
                "alias": hasattr(anomalib.data, "MVTec"),
                "package": "anomalib_gcaflow" in sys.modules,
            }))
            """,
            **{DISABLE: "1"},
        ),
    )
    assert info == {"hook": False, "model": False, "alias": False, "package": False}


# --------------------------------------------------------------------------------------------------------------
# the generic post-import machinery, on a throwaway package (no anomalib)


def test_post_import_callback_runs_once_after_the_module_executed(tmp_path: Path) -> None:
    pkg = tmp_path / "pkgx"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "sub.py").write_text("VALUE = 42\n")
    (pkg / "bad.py").write_text("VALUE = 1\n")
    info = _last_json(
        _python(
            f"""
            import json, sys
            sys.path[:0] = [{str(SRC)!r}, {str(tmp_path)!r}]
            import anomalib_gcaflow_hook as hook
            hook.install(force=True)
            seen = []

            def callback(module):
                import pkgx  # the parent attribute is bound before callbacks run
                seen.append((module.VALUE, pkgx.sub is module))

            def broken(module):
                raise RuntimeError("boom")

            hook.when_imported("pkgx.sub", callback)
            hook.when_imported("pkgx.bad", broken)
            import pkgx.sub, pkgx.bad
            import pkgx.sub
            print(json.dumps({{
                "seen": seen,
                "loader": type(pkgx.sub.__loader__).__name__,
                "bad_imported": pkgx.bad.VALUE,
                "late": hook.when_imported("pkgx.sub", callback) or seen[-1],
            }}))
            """,
            **{DISABLE: "1"},
        ),
    )
    assert info["seen"] == [[42, True], [42, True]]  # once at import, once for the late registration
    assert info["loader"] == "SourceFileLoader"
    assert info["bad_imported"] == 1


def test_post_import_callback_with_a_loader_that_refuses_attributes() -> None:
    info = _last_json(
        _python(
            f"""
            import json, sys, types
            sys.path.insert(0, {str(SRC)!r})
            import anomalib_gcaflow_hook as hook
            from importlib.machinery import ModuleSpec

            class SlotLoader:
                __slots__ = ()
                def create_module(self, spec):
                    return None
                def exec_module(self, module):
                    module.VALUE = 7

            class SlotFinder:
                def find_spec(self, name, path=None, target=None):
                    return ModuleSpec(name, SlotLoader()) if name == "slotmod" else None

            sys.meta_path.append(SlotFinder())
            hook.install(force=True)
            seen = []
            hook.when_imported("slotmod", lambda module: seen.append(module.VALUE))
            import slotmod
            print(json.dumps({{"seen": seen, "loader": type(slotmod.__loader__).__name__}}))
            """,
            **{DISABLE: "1"},
        ),
    )
    assert info == {"seen": [7], "loader": "LoaderProxy"}


# --------------------------------------------------------------------------------------------------------------
# library use: anomalib.models.get_model / anomalib.data.get_datamodule


@requires_install
def test_data_alias_needs_neither_models_nor_the_package(tmp_path: Path) -> None:
    info = _last_json(
        _python(
            f"""
            import json, sys
            from anomalib.data import MVTec, MVTecAD, get_datamodule
            init_args = {{"root": {str(tmp_path)!r}, "category": "bottle"}}
            dm = get_datamodule({{"class_path": "MVTec", "init_args": init_args}})
            print(json.dumps({{
                "same": MVTec is MVTecAD,
                "type": type(dm).__name__,
                "name": dm.name,
                "models": "anomalib.models" in sys.modules,
                "package": "anomalib_gcaflow" in sys.modules,
            }}))
            """,
        ),
    )
    assert info == {"same": True, "type": "MVTecAD", "name": "MVTecAD", "models": False, "package": False}


@requires_install
def test_get_model_with_a_stand_in_model(tmp_path: Path) -> None:
    """The mechanism alone, whatever the real GCAFlow's signature."""
    env = _write_stand_in(tmp_path, STAND_IN_MODEL)
    info = _last_json(
        _python(
            """
            import json
            import anomalib.models as m
            print(json.dumps({
                "by_name": type(m.get_model("GCAFlow")).__module__,
                "by_snake": type(m.get_model("gcaflow")).__name__,
                "by_dict": type(m.get_model({"class_path": "GCAFlow"})).__name__,
                "by_path": type(m.get_model({"class_path": "anomalib.models.GCAFlow"})).__name__,
                "in_all": "GCAFlow" in m.__all__,
                "listed": "GCAFlow" in m.list_models(case="pascal"),
            }))
            """,
            **env,
        ),
    )
    assert info == {
        "by_name": "anomalib_gcaflow.lightning_model",
        "by_snake": "GCAFlow",
        "by_dict": "GCAFlow",
        "by_path": "GCAFlow",
        "in_all": True,
        "listed": True,
    }


@requires_install
def test_broken_package_warns_once_and_never_breaks_anomalib(tmp_path: Path) -> None:
    env = _write_stand_in(tmp_path, "raise ImportError('stand-in failure')\n")
    proc = _python(
        """
        import json
        import anomalib.models, anomalib.data
        import anomalib.models  # no second warning
        print(json.dumps({"model": hasattr(anomalib.models, "GCAFlow"), "alias": hasattr(anomalib.data, "MVTec")}))
        """,
        **env,
    )
    assert _last_json(proc) == {"model": False, "alias": True}
    lines = [line for line in proc.stderr.splitlines() if line.startswith("anomalib-gcaflow:")]
    assert len(lines) == 1, proc.stderr
    assert "stand-in failure" in lines[0]


def _real_init_args() -> str:
    # cheap, offline arguments if the real class has them
    return """
        import inspect
        from anomalib_gcaflow.lightning_model import GCAFlow
        wanted = {"backbone": "resnet18", "pre_trained": False}
        params = inspect.signature(GCAFlow).parameters
        kwargs = {k: v for k, v in wanted.items() if k in params}
    """


@requires_install
@requires_model
def test_get_model_resolves_the_real_gcaflow_in_a_plain_process() -> None:
    info = _last_json(
        _python(
            _code(
                """
            import json, sys
            import anomalib.models as m
            registered = m.GCAFlow  # attached by the hook, before anything imported anomalib_gcaflow by hand
            """,
                _real_init_args(),
                """
            print(json.dumps({
                "attr": registered is GCAFlow,
                "by_name": type(m.get_model("GCAFlow", **kwargs)).__name__,
                "by_dict": type(m.get_model({"class_path": "GCAFlow", "init_args": kwargs})).__name__,
                "direct_subclass": m.AnomalibModule in GCAFlow.__bases__,
            }))
            """,
            ),
        ),
    )
    assert info == {"attr": True, "by_name": "GCAFlow", "by_dict": "GCAFlow", "direct_subclass": True}


@requires_install
@requires_model
def test_importing_the_package_first_also_registers() -> None:
    info = _last_json(
        _python(
            """
            import json, sys
            import anomalib_gcaflow
            models = sys.modules["anomalib.models"]
            print(json.dumps({"attr": getattr(models, "GCAFlow", None) is anomalib_gcaflow.GCAFlow}))
            """,
        ),
    )
    assert info == {"attr": True}


# --------------------------------------------------------------------------------------------------------------
# the CLI: jsonargparse resolves the bare names


@pytest.mark.slow
@requires_install
@requires_model
@pytest.mark.parametrize(
    ("model", "data", "data_path"),
    [("GCAFlow", "MVTec", "anomalib.data.MVTec"), ("anomalib_gcaflow.GCAFlow", "MVTecAD", "anomalib.data.MVTecAD")],
)
def test_anomalib_command_resolves_model_and_data(model: str, data: str, data_path: str, tmp_path: Path) -> None:
    # --print_config parses (and checks) everything but instantiates nothing: no data needed on disk
    args = ["fit", "--print_config", "--model", model, "--data", data]
    args += ["--data.root", str(tmp_path / "missing"), "--data.category", "bottle"]
    out = _ok(_run([_anomalib_exe(), *args]))
    assert "class_path: anomalib_gcaflow.GCAFlow" in out
    assert f"class_path: {data_path}\n" in out


@pytest.mark.slow
@requires_install
@requires_model
def test_cli_instantiates_mvtecad_for_the_mvtec_alias(tmp_path: Path) -> None:
    """``--data MVTec`` builds a plain MVTecAD: results go to <Model>/MVTecAD/<category>, like ``--data MVTecAD``."""
    info = _last_json(
        _python(
            _code(
                """
            import json
            from anomalib.cli.cli import AnomalibCLI
            """,
                _real_init_args(),
                f"""
            args = ["fit", "--model", "GCAFlow", "--data", "MVTec", "--data.root", {str(tmp_path)!r},
                    "--data.category", "bottle", "--data.num_workers", "0", "--default_root_dir", {str(tmp_path)!r}]
            for key, value in kwargs.items():
                args += [f"--model.{{key}}", str(value).lower() if isinstance(value, bool) else str(value)]
            cli = AnomalibCLI(args=args, run=False)
            print(json.dumps({{"model": cli.model.name, "data": type(cli.datamodule).__name__,
                               "folder": cli.datamodule.name}}))
            """,
            ),
        ),
    )
    assert info == {"model": "GCAFlow", "data": "MVTecAD", "folder": "MVTecAD"}


@pytest.mark.slow
@requires_model
def test_python_m_fallback_works_without_the_hook(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "anomalib_gcaflow", "fit", "--print_config", "--model", "GCAFlow"]
    args += ["--data", "MVTec", "--data.root", str(tmp_path), "--data.category", "bottle"]
    out = _ok(_run(args, **{DISABLE: "1"}))
    assert "class_path: anomalib_gcaflow.GCAFlow" in out
    assert "class_path: anomalib.data.MVTec\n" in out
