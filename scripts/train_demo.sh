#!/usr/bin/env bash
# The main job: a short local multi-process run on mdp:mnist:easy with the
# paper's settings except the number of learner steps, an evaluator attached.
# Creates .venv first if needed. Extra args are passed to launch.train.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/ensure_env.sh"
cd "$ROOT"
RUN_DIR="${RUN_DIR:-runs/mnist_easy_$(date +%Y%m%d-%H%M%S)}"
exec "$VENV_PYTHON" -m launch.train \
  --run_dir="$RUN_DIR" --env=mdp:mnist:easy --launch_type=local_mp --num_actors=2 \
  --max_learner_steps=10000 --probe_every=5000 --probe_steps=2000 "$@"
