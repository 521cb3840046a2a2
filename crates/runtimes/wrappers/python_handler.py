"""taskexec handler-mode wrapper for Python.

Usage: python3 -E -s -B python_handler.py /task/main.py

Imports the modules named in $TASK_PRELOAD (comma-separated dotted names,
the task's `definition.preload`) from the interpreter's own paths, reads the
task input (JSON) from the file named by $TASK_INPUT, loads the
user's file as module "task_main" (its directory first on sys.path, so a
multi-file task imports its siblings), calls main(input), awaits the result if
it is awaitable, and writes the JSON of the return value to $TASK_OUTPUT.

On failure it writes {"type", "message", "stack"} to $TASK_ERROR and exits 1:
  - an exception in user code: its class name, str(), and the traceback (also
    printed to stderr);
  - a return value that is not JSON-serializable (NaN included): NotSerializable;
  - no callable main: HandlerNotFound;
  - an unreadable or invalid input file: InputError;
  - a module of $TASK_PRELOAD that fails to import: PreloadError.

Only json, os, sys and importlib.util are imported up front: this runs on
every task, so traceback and asyncio are imported only when needed.
"""

import importlib.util
import json
import os
import sys


def _write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _fail(kind, message, stack=""):
    report = json.dumps({"type": kind, "message": message, "stack": stack})
    path = os.environ.get("TASK_ERROR")
    if path:
        try:
            _write(path, report)
        except OSError as e:
            sys.stderr.write("taskexec: cannot write the error report: %s\n" % e)
    sys.stderr.flush()
    sys.exit(1)


def _user_exception(exc):
    import traceback

    # Leave out the wrapper's own frames and the import machinery's: the
    # stack starts in user code.
    tb = exc.__traceback__
    this_file = os.path.abspath(__file__)
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if not (name.startswith("<frozen importlib") or os.path.abspath(name) == this_file):
            break
        tb = tb.tb_next
    stack = "".join(traceback.format_exception(type(exc), exc, tb))
    sys.stderr.write(stack)
    _fail(type(exc).__name__, str(exc), stack)


async def _await(awaitable):
    return await awaitable


def _run():
    if len(sys.argv) != 2:
        _fail("UsageError", "usage: python_handler.py <entry file>")
    entry = sys.argv[1]

    # Before the task's directory is on sys.path: a preloaded module is
    # never one of the task's own files. (In a fork server's child they
    # were imported before the fork; these imports then find them loaded.)
    preload = os.environ.get("TASK_PRELOAD")
    if preload:
        for name in preload.split(","):
            try:
                importlib.import_module(name)
            except Exception as e:  # noqa: BLE001 - a module may raise anything
                _fail("PreloadError", "definition.preload: cannot import %s: %s: %s" % (name, type(e).__name__, e))

    input_path = os.environ.get("TASK_INPUT")
    value = None
    if input_path:
        try:
            with open(input_path, "r", encoding="utf-8") as f:
                value = json.load(f)
        except (OSError, ValueError) as e:
            _fail("InputError", "cannot read the task input from TASK_INPUT (%s): %s" % (input_path, e))

    # The task's directory replaces the wrapper's own on sys.path.
    sys.path[0] = os.path.dirname(os.path.abspath(entry))
    try:
        spec = importlib.util.spec_from_file_location("task_main", entry)
        if spec is None or spec.loader is None:
            _fail("HandlerNotFound", "handler mode needs a function main(input) in %s (the file cannot be loaded as a Python module)" % entry)
        module = importlib.util.module_from_spec(spec)
        sys.modules["task_main"] = module
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - user code may raise anything
        _user_exception(e)

    main = getattr(module, "main", None)
    if not callable(main):
        _fail("HandlerNotFound", "handler mode needs a function main(input) in %s" % entry)

    try:
        result = main(value)
        if hasattr(result, "__await__"):
            import asyncio

            result = asyncio.run(_await(result))
    except Exception as e:  # noqa: BLE001 - user code may raise anything
        _user_exception(e)

    try:
        text = json.dumps(result, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError) as e:
        _fail("NotSerializable", "handler return value is not JSON-serializable: %s" % e)

    output_path = os.environ.get("TASK_OUTPUT")
    if output_path:
        try:
            _write(output_path, text)
        except OSError as e:
            _fail("OutputError", "cannot write the task output to TASK_OUTPUT (%s): %s" % (output_path, e))
    else:
        sys.stdout.write(text + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    _run()
