"""``python -m anomalib_gcaflow <subcommand> ...``: anomalib's CLI with GCAFlow registered and seeds honoured.

Same arguments as the ``anomalib`` command (``train``, ``fit``, ``test``, ``predict``, ``export``,
``benchmark``, ...). It registers explicitly, so it works without the start-up hook
(e.g. with ``ANOMALIB_GCAFLOW_DISABLE_PLUGIN=1``, or when the ``.pth`` file was not installed).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    """Register GCAFlow / ``MVTec`` with anomalib, then run anomalib's CLI on ``argv`` (default: sys.argv)."""
    import anomalib.cli.cli

    from anomalib_gcaflow_hook import register, seed_cli_runs

    register()
    seed_cli_runs(anomalib.cli.cli)
    sys.argv = ["python -m anomalib_gcaflow", *(sys.argv[1:] if argv is None else argv)]
    anomalib.cli.cli.main()


if __name__ == "__main__":
    main()
