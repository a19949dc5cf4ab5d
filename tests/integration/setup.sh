#!/usr/bin/env bash
# Build the integration suite's own virtual environment, .venv-integration/, from the package
# registry: torch + torchvision + timm (unpinned), yolov5 (without its pile of optional
# dependencies: only what its model, loader and train-style checkpoint need), ultralytics,
# onnxsim, onnxslim, onnxscript, and modelsurgeon from this checkout (editable).
#
#   bash tests/integration/setup.sh            # then:
#   .venv-integration/bin/python -m pytest -m integration tests/integration
#
# VENV=path overrides the location; an existing venv is reused (pip skips what is installed).
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${VENV:-.venv-integration}
start=$(date +%s)

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }

# 1. torch first, unpinned: every later install finds it satisfied and never pulls another one.
pip torch torchvision timm
# 2. ultralytics (yolov5 imports it too); its requirements do not ask for a newer torch.
pip ultralytics
# 3. yolov5 without its declared dependencies (sahi, roboflow, boto3, tensorboard, ... and an
#    ultralytics pin), then the imports its models, attempt_load and train-style checkpoints need:
#    pkg_resources went away in setuptools 81; its hub helper uses huggingface_hub < 0.25 APIs.
pip --no-deps yolov5
pip "setuptools<81" "huggingface-hub<0.25" pandas seaborn scipy tqdm psutil pyyaml requests \
    gitpython matplotlib pillow opencv-python
# 4. ONNX tools to compare with, the dynamo exporter's onnxscript, and this checkout (with pytest;
#    not its test extra, whose opencv-python-headless would overwrite the cv2 of YOLO's opencv-python).
pip onnxsim onnxslim onnxscript
pip -e . pytest

"$VENV/bin/python" - <<'PY'
import importlib, torch, torchvision, timm, onnx, onnxruntime
for name in ("yolov5.models.yolo", "yolov5.models.experimental", "ultralytics.nn.tasks",
             "onnxsim", "onnxslim", "onnxscript", "modelsurgeon"):
    importlib.import_module(name)
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, "
      f"onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}")
PY
echo "integration venv ready in $(( $(date +%s) - start )) s: $(du -sh "$VENV" | cut -f1) in $VENV"
