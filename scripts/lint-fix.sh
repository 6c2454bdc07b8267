#!/usr/bin/env bash
# Apply the linter's fixes and the formatter over the whole tree (configuration: [tool.ruff] in
# pyproject.toml). Run once from the repository root after merging, then commit; tests/test_lint.py
# checks that the tree stays so. Only fixes that do not change behaviour are applied:
#  - every safe fix (import order, pyupgrade rewrites to Python 3.10 syntax, unused imports, ...);
#  - two unsafe fixes, reviewed: B007 (an unused loop variable renamed `_name`), F841 (an unused assignment
#    dropped; the call on its right-hand side stays).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m ruff check --fix --silent . || true   # what has no fix is reported by the last step
python -m ruff check --fix --unsafe-fixes --select B007,F841 --silent . || true
python -m ruff format --silent .
python -m ruff check . && python -m ruff format --check .
