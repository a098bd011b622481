#!/usr/bin/env bash
# Set up, lint, and run the test suite. Arguments go to pytest.
# Exit status: pytest's (no tests collected counts as a failure), or 1 if only the lint failed.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash "$root/scripts/setup.sh"

have_initdb() {
    command -v initdb >/dev/null 2>&1 && return 0
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
}
if ! have_initdb; then
    if [[ "$(id -u)" -eq 0 ]]; then
        echo "test: installing PostgreSQL server binaries (apt-get install postgresql)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq postgresql >/dev/null
    else
        echo "test: PostgreSQL server binaries (initdb) not found; PostgreSQL tests will be skipped" \
            "(install the postgresql package, or set VRAMFLOW_TEST_POSTGRES_URL)" >&2
    fi
fi

echo "test: ruff check ."
lint=0
.venv/bin/ruff check . || lint=$?

echo "test: pytest $*"
status=0
.venv/bin/python -m pytest "$@" || status=$?
if [[ $status -eq 5 ]]; then
    echo "test: pytest collected no tests; counting that as a failure" >&2
fi
if [[ $status -eq 0 && $lint -ne 0 ]]; then
    echo "test: tests passed but ruff check failed" >&2
    status=1
fi
exit "$status"
