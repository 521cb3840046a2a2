// Script mode: greet the name in the task input.
//
// Reads the input JSON from the file named by $TASK_INPUT (or from stdin when
// that is not set) and writes {"greeting": "hello, <name>"} to the file named
// by $TASK_OUTPUT (or to stdout).
'use strict';

const fs = require('fs');

const inputPath = process.env.TASK_INPUT;
const input = JSON.parse(fs.readFileSync(inputPath || 0, 'utf8'));

// Without --input the task's input is null: greet the world then.
const name = input?.name ?? 'world';
console.log(`greeting ${name}`);

const result = JSON.stringify({ greeting: `hello, ${name}` });
const outputPath = process.env.TASK_OUTPUT;
if (outputPath) {
  fs.writeFileSync(outputPath, result);
} else {
  console.log(result);
}
