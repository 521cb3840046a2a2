#!/usr/bin/bash
# Script mode: a slow task, to watch or cancel while it runs. Sleeps for
# the input's "seconds" (30 without one), then says it is done.
set -euo pipefail

if [[ -n "${TASK_INPUT:-}" ]]; then
    input=$(<"$TASK_INPUT")
else
    input=$(cat)
fi

seconds=30
re='"seconds"[[:space:]]*:[[:space:]]*([0-9]+)'
if [[ $input =~ $re ]]; then
    seconds=${BASH_REMATCH[1]}
fi

sleep "$seconds"
result="{\"slept\": $seconds}"
if [[ -n "${TASK_OUTPUT:-}" ]]; then
    printf '%s' "$result" > "$TASK_OUTPUT"
else
    printf '%s\n' "$result"
fi
