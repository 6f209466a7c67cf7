#!/usr/bin/env bash
# A short GPU check (about 5 minutes on one GPU): the CUDA integer kernels against the int64
# oracle under Hypothesis, then QuantLinear W8A8 / W4A8 / W4A4 against fp32 and bf16 F.linear on
# the GPU, measured side by side. Run from the repository root in an installed environment.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
python -m pytest tests/test_kernels.py -m gpu -q -p no:cacheprovider
python -m quantvla bench kernels --device cuda --rounds 15 --json "${OUT:-.}/gpu-kernels.json"
