#!/usr/bin/bash
# Script mode: greet the name in the task input.
#
# Reads the input JSON from the file named by $TASK_INPUT (or from stdin when
# that is not set) and writes {"greeting": "hello, <name>"} to the file named
# by $TASK_OUTPUT (or to stdout). Bash builtins only: no jq in the sandbox.
set -euo pipefail

if [[ -n "${TASK_INPUT:-}" ]]; then
    input=$(<"$TASK_INPUT")
else
    input=$(cat)
fi

name=world
re='"name"[[:space:]]*:[[:space:]]*"(([^"\\]|\\.)*)"'
if [[ $input =~ $re ]]; then
    name=${BASH_REMATCH[1]}
fi

echo "greeting $name"

# $name is still JSON-escaped as it came from the input, so it can go back as is.
result="{\"greeting\": \"hello, $name\"}"
if [[ -n "${TASK_OUTPUT:-}" ]]; then
    printf '%s' "$result" > "$TASK_OUTPUT"
else
    printf '%s\n' "$result"
fi
