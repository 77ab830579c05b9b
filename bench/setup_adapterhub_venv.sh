#!/usr/bin/env bash
# A separate venv for AdapterHub `adapters` 1.3.0, which only works with transformers 4.57.x.
# Used by bench/compacter_vs_adapterhub.py; kept out of the package and out of git.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.venv-adapterhub"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0
"$venv/bin/python" -m pip install -q --disable-pip-version-check "transformers==4.57.6" "adapters==1.3.0"
echo "$venv"
