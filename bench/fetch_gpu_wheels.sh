#!/usr/bin/env bash
# Downloads the peers bench/gpu_check.sh compares against (pure Python + Triton wheels) into
# .whl/ (git-ignored), for the GPU machine's Python 3.12; run where a registry is reachable.
# gpu_check.sh installs them there with --no-index --no-deps into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl cut-cross-entropy==25.1.1 liger-kernel==0.8.5
ls -l .whl
