#!/usr/bin/env bash
# The README's test command. Creates ./.venv if it is missing (or uses $GCAFLOW_VENV), installs the project with
# its test extras (pinned torch/torchvision/anomalib; PyPI is the only network access), then runs the whole pytest
# suite offline. Extra arguments go to pytest, e.g.  bash scripts/run_tests.sh -m "not slow"
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV="${GCAFLOW_VENV:-.venv}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
# no model hub: a pretrained download must fail at once instead of hanging
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "run_tests.sh: creating $VENV"
    python3 -m venv "$VENV"
fi
# editable, so that the start-up hook that registers `--model GCAFlow` with anomalib is installed as well
"$VENV/bin/python" -m pip install -e ".[test]"

if [ ! -d ../shared/data/mvtec_ad/bottle ]; then
    echo "run_tests.sh: ../shared/data/mvtec_ad/bottle not found: the tests on real data will be skipped" >&2
fi

status=0
"$VENV/bin/python" -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
    # pytest's "no tests collected": a run that checked nothing must not look green
    echo "run_tests.sh: pytest collected no tests (exit status 5); check tests/ and the arguments: $*" >&2
    exit 1
fi
exit "$status"
