#!/usr/bin/env bash
# Run the utils_logging tests under every Python 3.9-3.13 found here (macOS's system
# python3 is 3.9).  Each gets a small venv with only the test tools: the module itself
# must need nothing but the standard library.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
    local version=$1 candidate
    for candidate in "python$version" "$HOME"/.pyenv/versions/"$version".*/bin/"python$version"; do
        if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys' >/dev/null 2>&1; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

tested=()
for version in 3.9 3.10 3.12 3.13; do
    python=$(find_python "$version") || { echo "python$version: not installed here, skipped"; continue; }
    venv=".venv-py$version"
    if [ ! -x "$venv/bin/pytest" ]; then
        "$python" -m venv "$venv"
        "$venv/bin/python" -m pip install --quiet --upgrade pip
        "$venv/bin/python" -m pip install --quiet pytest hypothesis
    fi
    echo "== utils_logging tests on $("$venv/bin/python" --version)"
    "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/logging_module
    tested+=("$version")
done
if [ ${#tested[@]} -eq 0 ]; then
    echo "utils_logging: no other Python found; the vermin check still holds it to 3.9"
else
    echo "utils_logging tested on Python ${tested[*]}"
fi
