#!/usr/bin/env bash
# Run gpu_check.py on a GPU machine whose Python has torch and transformers but neither vramflow
# nor its other dependencies, and no network: everything else comes as wheels in .whl/, gathered
# on a machine with the checkout and its install:
#   pip download -d .whl 'prefect==3.9.1' sqlalchemy alembic pypdf ...   (for the GPU machine's
#   Python and platform), and vramflow's own: pip wheel --no-deps -w .whl .
# Then, on the GPU machine, from the repository root:
#   bash benchmarks/on_gpu_machine.sh [gpu_check.py options]
set -euo pipefail
site="${VRAMFLOW_SITE:-/tmp/vramflow-site}"
python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
exec python3 benchmarks/gpu_check.py "$@"
