#!/usr/bin/env bash
# Pull-request checks on CPU, in an environment where `pip install torch==2.13.0 -e '.[dev,libero,third-party]'`
# ran: lint, the project's own tests (README's test command: the fast tier), the slow tier (real
# LIBERO episodes, whole main jobs under pytester) with the "ci" Hypothesis profile over the
# property tests too, and the main job for both models from an empty folder. Each step prints its
# wall time. Runs the same locally and in .github/workflows/pr.yml.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { local t0=$SECONDS; "$@"; echo "ci: '$*' took $((SECONDS - t0)) s"; }
step ruff check quantvla pytest_quantvla tests
step mypy --strict quantvla/quant pytest_quantvla
step python -m pytest -n 2 tests -q -m "not slow"
step python -m pytest -n 2 tests -q -m slow
step python -m pytest -n 2 tests -q -m property --hypothesis-profile=ci
main_dir=$(mktemp -d)
for model in pi05 gr00t-n15; do
  (cd "$main_dir" && step pytest --quantvla-model="$model" -q --quantvla-report="$main_dir/$model.json")
done
