#!/usr/bin/env bash
# Run the default model over the bundled demo PDF and show the stored results.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"

pdf="$(dirname "$0")/../vramflow/demo/demo.pdf"
"$root/.venv/bin/vramflow" run "$pdf" --prompt "Summarise this page in two sentences."
"$root/.venv/bin/vramflow" show "$pdf"
