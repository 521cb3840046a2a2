"""Script mode: greet the name in the task input.

Reads the input JSON from the file named by $TASK_INPUT (or from stdin when
that is not set) and writes {"greeting": "hello, <name>"} ("world" without a name) to the file named by
$TASK_OUTPUT (or to stdout).
"""

import json
import os
import sys

input_path = os.environ.get("TASK_INPUT")
if input_path:
    with open(input_path, encoding="utf-8") as f:
        task_input = json.load(f)
else:
    task_input = json.load(sys.stdin)

# Without --input the task's input is null: greet the world then.
if not isinstance(task_input, dict):
    task_input = {}
name = task_input.get("name", "world")
print(f"greeting {name}")

result = {"greeting": f"hello, {name}"}
output_path = os.environ.get("TASK_OUTPUT")
if output_path:
    with open(output_path, "w", encoding="utf-8") as f:
        json.dump(result, f)
else:
    print(json.dumps(result))
