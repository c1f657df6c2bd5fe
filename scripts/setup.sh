#!/usr/bin/env bash
# Set up actsparse from scratch: a virtual environment in .venv with the package, its
# test tools and its evaluation extras (lm-eval, matplotlib), plus the default model
# (smollm2-135m) and corpus (Brown) in the cache.
# Safe to run again; finished steps are quick. Every package but torch is pinned by
# constraints.txt (the versions behind the README's numbers); CONSTRAINTS= (empty) installs
# the newest versions the package's ranges allow instead.
#
#   TORCH_SPEC   torch requirement to install (default: torch==2.13.0, the CPU build)
#   PYTHON       interpreter that creates the environment (default: python3)
#   CONSTRAINTS  pip constraints file (default: constraints.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
constraints=("-c" "${CONSTRAINTS-constraints.txt}")
[ -n "${CONSTRAINTS-constraints.txt}" ] || constraints=()
.venv/bin/python -m pip install -q --disable-pip-version-check "${constraints[@]}" -e ".[test,eval]"
.venv/bin/actsparse fetch brown smollm2-135m
