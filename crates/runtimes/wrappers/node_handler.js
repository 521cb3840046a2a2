// taskexec handler-mode wrapper for Node.js.
//
// Usage: node node_handler.js /task/main.js
//
// Reads the task input (JSON) from the file named by $TASK_INPUT, loads the
// user's module, finds its handler (`module.exports = async (input) => ...`,
// `exports.main` or `exports.default`), awaits its result and writes
// JSON.stringify of it to $TASK_OUTPUT, then exits 0.
//
// On failure it writes {"type", "message", "stack"} to $TASK_ERROR and exits 1:
//   - an exception in user code: its class name, message and stack (also
//     printed to stderr);
//   - a result that is not JSON (undefined, a function, a symbol, a BigInt,
//     NaN or Infinity, a cycle): NotSerializable;
//   - no handler function: HandlerNotFound;
//   - an unreadable or invalid input file: InputError.
'use strict';

const fs = require('fs');
const path = require('path');

function fail(type, message, stack) {
  const report = JSON.stringify({ type, message, stack: stack || '' });
  const file = process.env.TASK_ERROR;
  if (file) {
    try {
      fs.writeFileSync(file, report, 'utf8');
    } catch (e) {
      process.stderr.write(`taskexec: cannot write the error report: ${e.message}\n`);
    }
  }
  process.exit(1);
}

// The stack as user code sees it: without this wrapper's frames nor Node's
// module-loader internals.
function cleanStack(stack) {
  return stack
    .split('\n')
    .filter((line) => {
      if (!/^\s+at /.test(line)) return true;
      return !line.includes(__filename) && !line.includes('node:internal/');
    })
    .join('\n');
}

function userError(err) {
  if (err instanceof Error || (err && typeof err === 'object' && typeof err.stack === 'string')) {
    const type = (err.constructor && err.constructor.name) || err.name || 'Error';
    const stack = typeof err.stack === 'string' ? cleanStack(err.stack) : String(err);
    process.stderr.write(stack + '\n');
    fail(type, String(err.message), stack);
  }
  // `throw "text"` and friends: no class, no stack.
  const type = err === null ? 'null' : (err && err.constructor && err.constructor.name) || typeof err;
  let message;
  try {
    message = typeof err === 'string' ? err : JSON.stringify(err) ?? String(err);
  } catch (_) {
    message = String(err);
  }
  process.stderr.write(`Uncaught ${type}: ${message}\n`);
  fail(type, message, '');
}

function notSerializable(detail) {
  fail('NotSerializable', `handler return value is not JSON-serializable: ${detail}`, '');
}

function serialize(result) {
  if (result === undefined) {
    notSerializable('the handler returned undefined');
  }
  const replacer = function (key, value) {
    const where = key === '' ? 'the returned value' : `key "${key}"`;
    if (typeof value === 'function') throw new TypeError(`${where} is a function`);
    if (typeof value === 'symbol') throw new TypeError(`${where} is a symbol`);
    if (typeof value === 'number' && !Number.isFinite(value)) throw new TypeError(`${where} is ${value}`);
    return value;
  };
  try {
    return JSON.stringify(result, replacer);
  } catch (e) {
    notSerializable(e && e.message ? e.message : String(e));
  }
  return undefined;
}

async function load(entry) {
  const file = path.resolve(entry);
  if (file.endsWith('.mjs')) {
    const { pathToFileURL } = require('url');
    return import(pathToFileURL(file).href);
  }
  try {
    return require(file);
  } catch (e) {
    if (e && e.code === 'ERR_REQUIRE_ESM') {
      const { pathToFileURL } = require('url');
      return import(pathToFileURL(file).href);
    }
    throw e;
  }
}

function findHandler(mod) {
  if (typeof mod === 'function') return mod;
  if (mod && typeof mod.main === 'function') return mod.main;
  if (mod && typeof mod.default === 'function') return mod.default;
  if (mod && mod.default && typeof mod.default.main === 'function') return mod.default.main;
  return null;
}

async function run() {
  if (process.argv.length !== 3) {
    fail('UsageError', 'usage: node node_handler.js <entry file>', '');
  }
  const entry = process.argv[2];

  let input = null;
  const inputFile = process.env.TASK_INPUT;
  if (inputFile) {
    try {
      input = JSON.parse(fs.readFileSync(inputFile, 'utf8'));
    } catch (e) {
      fail('InputError', `cannot read the task input from TASK_INPUT (${inputFile}): ${e.message}`, '');
    }
  }

  let mod;
  try {
    mod = await load(entry);
  } catch (e) {
    userError(e);
  }
  const handler = findHandler(mod);
  if (handler === null) {
    fail(
      'HandlerNotFound',
      `handler mode needs a function main(input) in ${entry} ` +
        '(module.exports = async (input) => ..., exports.main or exports.default)',
      '',
    );
  }

  let result;
  try {
    result = await handler(input);
  } catch (e) {
    userError(e);
  }

  const text = serialize(result);
  const outputFile = process.env.TASK_OUTPUT;
  if (outputFile) {
    try {
      fs.writeFileSync(outputFile, text, 'utf8');
    } catch (e) {
      fail('OutputError', `cannot write the task output to TASK_OUTPUT (${outputFile}): ${e.message}`, '');
    }
  } else {
    process.stdout.write(text + '\n');
  }
  // The handler is done: timers or sockets it left open must not keep the task alive.
  process.exit(0);
}

run().catch((e) => {
  process.stderr.write(`taskexec: wrapper failure: ${e && e.stack ? e.stack : e}\n`);
  fail('WrapperError', String(e && e.message ? e.message : e), e && e.stack ? String(e.stack) : '');
});
