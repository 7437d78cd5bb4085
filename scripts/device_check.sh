#!/usr/bin/env bash
# The accelerator check, `launch/benchmarks/device_check.py`, on a machine with Python and JAX alone (no TensorFlow, Reverb,
# Launchpad, network); it prints one table, each figure beside the device and versions it was measured with.
#
#   bash scripts/device_check.sh --prepare   # here, with PyPI: the wheels it needs into build/device_wheels
#   bash scripts/device_check.sh             # there (carry build/device_wheels): install them, run the check
#   DEVICE_CHECK_QUICK=1 PYTHON=.venv/bin/python bash scripts/device_check.sh   # any machine: small sizes
#
# The wheels: dm-haiku 0.0.17, rlax 0.1.6, distrax 0.1.9, chex, optax, dm-env and their dependencies for
# CPython 3.12 on x86-64 Linux (about 9 MiB), without JAX, jaxlib, NumPy, SciPy, ml_dtypes and opt_einsum, which
# come with the machine's JAX (the pinned dm-haiku 0.0.12 does not run on current JAX). They are installed, only
# when the machine's Python cannot import that stack already, into build/device_site (pip --target, or unpacked
# where pip fails: nothing of the machine's own Python changes); the check then runs with it first on the path.
# Extra arguments go to the check (e.g. --archs=cnn). It is cut at DEVICE_CHECK_TIMEOUT seconds (290), keeping the
# rows measured by then.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=build/device_wheels
SITE=build/device_site
STACK='dm-haiku==0.0.17 rlax==0.1.6 distrax==0.1.9 chex optax dm-env absl-py'
ON_THE_MACHINE='^(jax|jaxlib|numpy|scipy|ml_dtypes|opt_einsum)-'

if [[ "${1:-}" == --prepare ]]; then
  download=$(mktemp -d)
  trap 'rm -rf "$download"' EXIT
  # pip download installs nothing; the dependency closure is resolved for the device's Python and platform.
  "$PYTHON" -m pip download --quiet --dest "$download" --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 $STACK
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  for wheel in "$download"/*.whl; do
    basename "$wheel" | grep -Eq "$ON_THE_MACHINE" || cp "$wheel" "$WHEELS/"
  done
  du -sh "$WHEELS" && ls "$WHEELS"
  exit 0
fi

site_path=""  # build/device_site goes on the path only when installed by this run, for this Python.
if ! "$PYTHON" -c 'import haiku, rlax, distrax, optax, chex, dm_env, absl' 2>/dev/null; then
  if compgen -G "$WHEELS/*.whl" > /dev/null; then
    echo "Installing $(ls "$WHEELS" | wc -l) wheels from $WHEELS into $SITE" >&2
    rm -rf "$SITE"
    if ! "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$SITE" "$WHEELS"/*.whl; then
      # No pip: a wheel is a zip of what site-packages holds; unpacked, it imports the same.
      echo "device_check: pip install failed; unpacking the wheels into $SITE instead" >&2
      rm -rf "$SITE"
      for wheel in "$WHEELS"/*.whl; do "$PYTHON" -m zipfile -e "$wheel" "$SITE"; done
    fi
    site_path="$SITE:"
  else
    echo "device_check: $PYTHON lacks dm-haiku/rlax/distrax/optax/chex/dm-env and $WHEELS holds no wheels" \
         "(bash scripts/device_check.sh --prepare, with network); trying anyway" >&2
  fi
fi

quick=()
[[ "${DEVICE_CHECK_QUICK:-0}" == 1 ]] && quick=(--quick)
PYTHONPATH="$site_path$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout "${DEVICE_CHECK_TIMEOUT:-290}" \
  "$PYTHON" -m launch.benchmarks.device_check "${quick[@]}" "$@"
