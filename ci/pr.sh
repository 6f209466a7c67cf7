#!/usr/bin/env bash
# Pull-request checks on CPU, in an environment where `pip install torch==2.13.0 -e '.[dev,libero]'`
# ran: lint, the project's own tests (README's test command), and the main job for both models
# from an empty folder. Runs the same locally and in .github/workflows/pr.yml.
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check quantvla pytest_quantvla tests
python -m pytest -n 2 tests -q
main_dir=$(mktemp -d)
for model in pi05 gr00t-n15; do
  (cd "$main_dir" && pytest --quantvla-model="$model" -q --quantvla-report="$main_dir/$model.json")
done
