"""Puts ``src/anomalib_gcaflow_plugin.pth`` into site-packages; all metadata lives in pyproject.toml.

Python runs the file's ``import`` line at start-up (docs/plugin.md). setuptools has no option that places a file
at the root of a wheel: regular wheels get it through ``build_py`` (``build_lib`` becomes the wheel's root),
editable wheels (PEP 660), which ignore ``build_lib``, through ``editable_wheel``.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "src/anomalib_gcaflow_plugin.pth"


class BuildPy(build_py):
    """``build_py`` that also copies the ``.pth`` file to the root of regular wheels and into sdists."""

    def run(self) -> None:
        """Build as usual, then put the start-up hook's ``.pth`` at the wheel's root (not for editable installs)."""
        super().run()
        if not self.editable_mode:
            self.copy_file(PTH, str(Path(self.build_lib, Path(PTH).name)), preserve_mode=False)

    def get_source_files(self) -> list[str]:
        """List the sources, the ``.pth`` included, so that sdists carry it."""
        return [*super().get_source_files(), PTH]


class EditableWheel(editable_wheel):
    """``editable_wheel`` that also copies the ``.pth`` file next to setuptools' own ``__editable__.*.pth``."""

    def _run_build_commands(self, dist_name, unpacked_wheel, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        result = super()._run_build_commands(dist_name, unpacked_wheel, *args, **kwargs)
        self.copy_file(PTH, str(Path(unpacked_wheel, Path(PTH).name)), preserve_mode=False)
        return result


setup(cmdclass={"build_py": BuildPy, "editable_wheel": EditableWheel})
