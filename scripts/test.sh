#!/usr/bin/env bash
# The whole test suite (lint included) in its own environment: bash scripts/test.sh [pytest args]
source "$(dirname "$0")/env.sh"
ruff check regionspot tests scripts
python -m pytest "$@"
