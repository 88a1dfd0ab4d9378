#!/bin/sh
# The GPU rows of the capture overhead, in one command that stops within 8 minutes:
# see benchmarks/gpu.py. Run from anywhere, e.g. `sh benchmarks/gpu.sh --out gpu.md`;
# PYTHON picks the interpreter (default python3), whose environment gets the CUDA builds.
cd "$(dirname "$0")/.." || exit 1
exec "${PYTHON:-python3}" benchmarks/gpu.py "$@"
