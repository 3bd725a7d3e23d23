"""Result files of the accuracy benchmark and the convergence study: atomic JSON, resumable records, folders."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.protocol import Protocol


def read_record(path: Path, protocol: Protocol) -> dict[str, Any] | None:
    """Load a finished record for resuming, refusing one made under another protocol.

    Args:
        path: The record's file.
        protocol: The current protocol.

    Returns:
        dict[str, Any] | None: The record, or ``None`` if it does not exist yet.
    """
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("protocol_digest") != protocol.digest():
        msg = (
            f"{path} was made under another protocol ({record.get('protocol')}) than this command's "
            f"({asdict(protocol)}); results of different protocols must not be mixed. Use another --out, or delete "
            "the old records."
        )
        raise ValueError(msg)
    return record


def write_json(path: Path, content: dict[str, Any]) -> None:
    """Write JSON atomically, so an interrupted run never leaves a half-written record to be resumed from.

    Args:
        path: Target file.
        content: The content.
    """
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(content, indent=1, sort_keys=False) + "\n")
    partial.replace(path)


def mkdir(path: Path) -> Path:
    """Create a folder and its parents if needed.

    Args:
        path: The folder.

    Returns:
        Path: The folder.
    """
    path.mkdir(parents=True, exist_ok=True)
    return path
