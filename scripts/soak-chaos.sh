#!/usr/bin/env bash
# Long soak of the Jepsen-style check: many more primary kills than CI runs. Usage: scripts/soak-chaos.sh [KILLS]
set -euo pipefail
cd "$(dirname "$0")/.."
exec ./bin/rubato chaos --kills "${1:-100}" --seconds 4 --json
