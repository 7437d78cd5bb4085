#!/usr/bin/env bash
# Creates .venv (CPython 3.10 + the pinned stack) when it is missing or stale.
# Source it: it leaves $VENV_PYTHON pointing at the environment's interpreter.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.installed-lock"
WANT="$(cat "$ROOT/requirements/lock.txt" "$ROOT/requirements/dev.txt" "$ROOT/requirements/cluster.txt" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"

find_python310() {
  local candidate
  for candidate in "${PYTHON310:-}" python3.10; do
    if [[ -n "$candidate" ]] && command -v "$candidate" >/dev/null 2>&1 \
        && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 10))' 2>/dev/null; then
      command -v "$candidate"; return 0
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    local version
    version="$(pyenv versions --bare 2>/dev/null | grep -E '^3\.10(\.[0-9]+)?$' | sort -V | tail -n1 || true)"
    if [[ -n "$version" ]]; then PYENV_VERSION="$version" pyenv which python; return 0; fi
  fi
  return 1
}

if [[ ! -x "$VENV/bin/python" || ! -f "$STAMP" || "$(cat "$STAMP")" != "$WANT" ]]; then
  if ! PY="$(find_python310)"; then
    cat >&2 <<'MSG'
error: CPython 3.10 is required (dm-launchpad 0.5.2 ships wheels for <= 3.10 only) and none was found.
Install one and re-run, or point PYTHON310 at it, e.g.:
  pyenv install 3.10.13            # then re-run this command
  uv python install 3.10           # then PYTHON310=$(uv python find 3.10)
  conda create -n py310 python=3.10
MSG
    exit 1
  fi
  echo "[setup] creating $VENV with $PY ($("$PY" --version 2>&1))" >&2
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade "pip==24.2" "setuptools==75.1.0" wheel >&2
  echo "[setup] installing the pinned stack (requirements/lock.txt, dev.txt, cluster.txt); first time takes a few minutes" >&2
  "$VENV/bin/python" -m pip install -q -r "$ROOT/requirements/lock.txt" -r "$ROOT/requirements/dev.txt" \
      -r "$ROOT/requirements/cluster.txt" >&2
  # compat mode: a .pth pointing at the repo, so packages added later import without reinstalling.
  "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$ROOT" --config-settings editable_mode=compat >&2
  echo "$WANT" > "$STAMP"
fi
VENV_PYTHON="$VENV/bin/python"
export VENV_PYTHON
