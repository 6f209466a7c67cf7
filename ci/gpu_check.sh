#!/usr/bin/env bash
# A short GPU check (about 5 minutes on one GPU): the CUDA integer kernels against the int64
# oracle under Hypothesis; QuantLinear W8A8 / W4A8 / W4A4 against fp32 and bf16 F.linear on the
# GPU, measured side by side; then the full-size pi0.5 on random weights, bf16 against
# quantvla-w4a8: action-chunk latency, component bytes and peak CUDA memory of each model.
# Run from the repository root in an installed environment; figures land in $OUT (default .).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
python -m pytest tests/test_kernels.py -m gpu -q -p no:cacheprovider
python -m quantvla bench kernels --device cuda --rounds 15 --json "$out/gpu-kernels.json"
python -m quantvla bench models --model pi05 --size full --dtype bf16 --device cuda --entries 1 --rounds 5 \
  --json "$out/gpu-pi05-full.json"
