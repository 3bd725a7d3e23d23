"""The repository root, for every test module (pytest puts ``tests/`` on ``sys.path``, as for tiny_training)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
