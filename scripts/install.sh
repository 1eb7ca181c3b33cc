#!/usr/bin/env bash
# Installs everything declip-pipeline needs on a fresh machine, idempotently:
#   bash scripts/install.sh          the pipeline (.venv with the package and its pinned deps)
#   bash scripts/install.sh --dev    plus the test tools (pytest, ruff, hadolint, snakefmt, chromium)
# System packages (Debian's WordNet for the offline NLTK route, Chromium for the
# report's browser test) are installed when apt-get is usable; otherwise the
# script says what it skipped and the pipeline falls back to other NLTK sources.
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
[[ "${1:-}" == "--dev" ]] && dev=1

apt_packages=(wordnet-base wordnet-sense-index)
((dev)) && apt_packages+=(chromium)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  if command -v apt-get >/dev/null 2>&1 && [[ $(id -u) == 0 ]]; then
    echo "install: apt-get install ${missing[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "install: skipped system packages ${missing[*]} (needs root and apt-get);" \
      "setup-nltk can use the seed's NLTK zips instead (see README)" >&2
  fi
fi

python=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ((dev)); then
  .venv/bin/python -m pip install -q -e '.[dev]'
else
  .venv/bin/python -m pip install -q -e .
fi
echo "install: done ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
