#!/usr/bin/env bash
# One shard of the nightly GPU job: the built-in checks plus the LIBERO gates of one suite on real
# checkpoints, one xdist worker per GPU, a JSON report per shard. A merge step
# (`python -m quantvla merge-reports`) then decides every suite once over all shards.
#   MODEL=pi05 SUITE=libero_spatial CHECKPOINT=/cache/pi05_libero EPISODES=50 ci/nightly.sh
set -euo pipefail
: "${MODEL:?set MODEL (pi05 or gr00t-n15)}" "${SUITE:?set SUITE}" "${CHECKPOINT:?set CHECKPOINT}"
gpus=$(python -c "import torch; print(max(1, torch.cuda.device_count()))")
mkdir -p reports
pytest --quantvla-model="$MODEL" --quantvla-config=full --quantvla-checkpoint="$CHECKPOINT" \
  --quantvla-device=cuda --quantvla-suites="$SUITE" --quantvla-episodes="${EPISODES:-50}" \
  -m "libero or gpu" -n "$gpus" -p no:cacheprovider --quantvla-report="reports/$MODEL-$SUITE.json"
