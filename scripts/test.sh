#!/usr/bin/env bash
# The whole test suite (lint included) in its own environment: bash scripts/test.sh [pytest args]
source "$(dirname "$0")/env.sh"
ruff check regionspot tests scripts
lint-imports  # the import contracts in pyproject.toml (DESIGN.md §1)
python -m pytest "$@"
