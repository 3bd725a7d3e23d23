"""The start-up hook (docs/plugin.md), checked in fresh interpreters of the environment that runs pytest.

The hook is started by the ``anomalib_gcaflow_plugin.pth`` file that installing the project (``pip install -e .``
or ``pip install .``) puts into site-packages, so these tests are skipped where the project is not installed.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

DISABLE = "ANOMALIB_GCAFLOW_DISABLE_PLUGIN"
PTH_NAME = "anomalib_gcaflow_plugin.pth"
# cheap, offline model arguments (no weights download)
MODEL_ARGS = {"backbone": "resnet18", "pre_trained": False}


def _distribution() -> importlib.metadata.Distribution | None:
    try:
        return importlib.metadata.distribution("anomalib-gcaflow")
    except importlib.metadata.PackageNotFoundError:
        return None


pytestmark = pytest.mark.skipif(
    _distribution() is None, reason="anomalib-gcaflow is not installed in this interpreter: no start-up hook"
)


def _run(args: list[str], **env: str) -> str:
    full_env = {k: v for k, v in os.environ.items() if k != DISABLE}
    full_env.update(HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", **env)
    proc = subprocess.run(args, capture_output=True, text=True, env=full_env, timeout=300, check=False)
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    return proc.stdout


def _python(code: str, **env: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON object on its last line."""
    return json.loads(_run([sys.executable, "-c", textwrap.dedent(code)], **env).strip().splitlines()[-1])


def test_pth_file_is_installed_with_the_distribution() -> None:
    files = [f for f in (_distribution().files or []) if f.name == PTH_NAME]
    assert files, f"{PTH_NAME} is not in the RECORD of the installed distribution (setup.py broken?)"
    assert "anomalib_gcaflow_hook" in Path(_distribution().locate_file(files[0])).read_text()


def test_start_up_installs_the_finder_and_imports_nothing_heavy() -> None:
    info = _python("""
        import json, sys
        print(json.dumps({
            "finder": [type(f).__module__ for f in sys.meta_path if type(f).__name__ == "_Finder"],
            "heavy": [m for m in ("torch", "numpy", "anomalib", "anomalib_gcaflow", "lightning") if m in sys.modules],
        }))
    """)
    assert info == {"finder": ["anomalib_gcaflow_hook"], "heavy": []}


def test_get_model_and_get_datamodule_find_the_bare_names(tmp_path: Path) -> None:
    info = _python(f"""
        import json, sys
        import anomalib.data as data
        import anomalib.models as models
        args = {MODEL_ARGS!r}
        data_args = {{"root": {str(tmp_path)!r}, "category": "bottle"}}
        dm = data.get_datamodule({{"class_path": "MVTec", "init_args": data_args}})
        print(json.dumps({{
            "by_name": type(models.get_model("GCAFlow", **args)).__module__,
            "by_class_path": type(models.get_model({{"class_path": "GCAFlow", "init_args": args}})).__name__,
            "by_path": type(models.get_model({{"class_path": "anomalib.models.GCAFlow", "init_args": args}})).__name__,
            "listed": "GCAFlow" in models.list_models(case="pascal"),
            "datamodule": [type(dm).__name__, dm.name],
            "loaders": [type(m.__loader__).__name__ for m in (data, models, sys.modules["anomalib_gcaflow"])],
        }}))
    """)
    assert info == {
        "by_name": "anomalib_gcaflow.model.lightning_model",
        "by_class_path": "GCAFlow",
        "by_path": "GCAFlow",
        "listed": True,
        "datamodule": ["MVTecAD", "MVTecAD"],  # the alias builds a plain MVTecAD: same results folder
        "loaders": ["SourceFileLoader"] * 3,  # the hook's loader proxy hands the real loader back
    }


def test_benchmark_job_generator_accepts_gcaflow_in_the_model_grid(tmp_path: Path) -> None:
    # `anomalib benchmark` builds each grid point with anomalib.models.get_model / anomalib.data.get_datamodule
    info = _python(f"""
        import json
        from anomalib.pipelines.benchmark.generator import BenchmarkJobGenerator
        grid = {{
            "seed": 42,
            "model": {{"class_path": {{"grid": ["GCAFlow", "Padim"]}}, "init_args": {MODEL_ARGS!r}}},
            "data": {{"class_path": "MVTec", "init_args": {{"root": {str(tmp_path)!r}, "category": "bottle"}}}},
        }}
        jobs = BenchmarkJobGenerator(accelerator="cpu").generate_jobs(grid, None)
        print(json.dumps([[type(job.model).__name__, type(job.datamodule).__name__] for job in jobs]))
    """)
    assert info == [["GCAFlow", "MVTecAD"], ["Padim", "MVTecAD"]]


def test_importing_the_package_first_also_registers() -> None:
    # the package imports anomalib.models half-way through its own import: it registers once it has run
    info = _python("""
        import json, sys
        import anomalib_gcaflow
        registered = getattr(sys.modules["anomalib.models"], "GCAFlow", None)
        print(json.dumps({"registered": registered is anomalib_gcaflow.GCAFlow}))
    """)
    assert info == {"registered": True}


def test_disable_variable_turns_the_hook_off() -> None:
    info = _python(
        """
        import json, sys
        import anomalib.data, anomalib.models
        print(json.dumps({
            "model": hasattr(anomalib.models, "GCAFlow"),
            "alias": hasattr(anomalib.data, "MVTec"),
            "package": "anomalib_gcaflow" in sys.modules,
        }))
        """,
        **{DISABLE: "1"},
    )
    assert info == {"model": False, "alias": False, "package": False}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("command", "model", "data", "data_path", "env"),
    [
        pytest.param("anomalib", "GCAFlow", "MVTec", "anomalib.data.MVTec", {}, id="bare-names"),
        # the dotted path needs no hook at all
        pytest.param(
            "anomalib", "anomalib_gcaflow.GCAFlow", "MVTecAD", "anomalib.data.MVTecAD", {DISABLE: "1"}, id="dotted"
        ),
        # the fallback registers explicitly
        pytest.param("python -m", "GCAFlow", "MVTec", "anomalib.data.MVTec", {DISABLE: "1"}, id="python-m"),
    ],
)
def test_command_resolves_model_and_data(
    command: str, model: str, data: str, data_path: str, env: dict[str, str], tmp_path: Path
) -> None:
    exe = Path(sys.executable).with_name("anomalib")
    if command == "anomalib" and not exe.exists():
        pytest.skip(f"no `anomalib` console script next to {sys.executable}")
    prefix = [str(exe)] if command == "anomalib" else [sys.executable, "-m", "anomalib_gcaflow"]
    # --print_config parses and checks everything but builds nothing: no data needed on disk
    args = ["fit", "--print_config", "--model", model, "--data", data]
    out = _run([*prefix, *args, "--data.root", str(tmp_path), "--data.category", "bottle"], **env)
    assert "class_path: anomalib_gcaflow.GCAFlow" in out
    assert f"class_path: {data_path}\n" in out
