"""Build hooks of anomalib-gcaflow. All metadata lives in pyproject.toml.

Their only job: put ``src/anomalib_gcaflow_plugin.pth`` at the top level of the wheel, i.e. into
site-packages, where Python executes its single ``import`` line at start-up (see docs/plugin.md).
setuptools has no declarative option for that, so:

* regular wheels (``pip install .``, ``pip wheel .``, ``python -m build``): ``build_py`` copies the file into
  ``build_lib``, whose root becomes the wheel's root (purelib);
* editable wheels (``pip install -e .``, PEP 660): ``editable_wheel`` ignores ``build_lib`` and only ships its
  own ``__editable__.*.pth`` plus what lies in its unpacked-wheel folder, so the file is copied there
  (that folder is also where setuptools writes scripts/data of editable wheels; listed in the RECORD, so
  ``pip uninstall`` removes it), together with a copy of the small start-up module (see below).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py as _build_py

PTH_NAME = "anomalib_gcaflow_plugin.pth"
PTH_SOURCE = os.path.join("src", PTH_NAME)  # relative: setuptools wants relative paths in sdists
HOOK_SOURCE = os.path.join("src", "anomalib_gcaflow_hook.py")


class build_py(_build_py):  # noqa: N801 - setuptools command naming
    """build_py that also ships the start-up ``.pth`` file at the top level of (non-editable) wheels."""

    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            self.copy_file(PTH_SOURCE, os.path.join(self.build_lib, PTH_NAME), preserve_mode=False)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:  # noqa: FBT001, FBT002
        outputs = list(super().get_outputs(include_bytecode))
        if not self.editable_mode:
            outputs.append(os.path.join(self.build_lib, PTH_NAME))
        return outputs

    def get_source_files(self) -> list[str]:
        # makes sdists carry the .pth file (a wheel built from the sdist needs it)
        return [*super().get_source_files(), PTH_SOURCE]


cmdclass: dict[str, type] = {"build_py": build_py}

try:  # setuptools >= 64 (PEP 660); the build-system table requires >= 68
    from setuptools.command.editable_wheel import editable_wheel as _editable_wheel
except ImportError:  # pragma: no cover
    _editable_wheel = None

if _editable_wheel is not None:

    class editable_wheel(_editable_wheel):  # noqa: N801
        """editable_wheel that also ships the start-up ``.pth`` file (next to ``__editable__.*.pth``)."""

        def run(self) -> None:
            if not hasattr(_editable_wheel, "_run_build_commands"):
                warnings.warn(
                    f"this setuptools has no editable_wheel._run_build_commands: {PTH_NAME} is NOT installed, "
                    "bare `anomalib ... --model GCAFlow` will not work; use `python -m anomalib_gcaflow ...`",
                    stacklevel=1,
                )
            super().run()

        def _run_build_commands(self, dist_name, unpacked_wheel, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            result = super()._run_build_commands(dist_name, unpacked_wheel, *args, **kwargs)
            self.copy_file(PTH_SOURCE, str(Path(unpacked_wheel, PTH_NAME)), preserve_mode=False)
            # The start-up module is COPIED too: site-packages precedes src/ on sys.path, and pip byte-compiles
            # it at install time. Imported from src/ it would be recompiled at every interpreter start when
            # .pyc files cannot be written (PYTHONDONTWRITEBYTECODE, read-only checkout): ~1-2 ms each time.
            # Consequence: after editing src/anomalib_gcaflow_hook.py, re-run `pip install -e .`
            # (tests/test_plugin.py checks that the installed copy is current).
            self.copy_file(HOOK_SOURCE, str(Path(unpacked_wheel, Path(HOOK_SOURCE).name)), preserve_mode=False)
            return result

    cmdclass["editable_wheel"] = editable_wheel

setup(cmdclass=cmdclass)
