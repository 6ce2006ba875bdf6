#!/usr/bin/env bash
# The main job on the built-in default: toy data + tiny backbones, extract -> train -> eval, on a CPU.
source "$(dirname "$0")/env.sh"
regionspot quickstart "$@"
