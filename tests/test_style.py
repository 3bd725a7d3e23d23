"""The code keeps the style configured in pyproject.toml: ruff's lint rules and its formatter."""

import subprocess
import sys

import pytest
from repo_paths import REPO_ROOT


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_finds_nothing(command: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *command, "src", "tests", "benchmarks"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"ruff {' '.join(command)} found:\n{result.stdout}{result.stderr}"
