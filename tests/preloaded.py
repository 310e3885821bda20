"""`python SCRIPT ARGV` without the interpreter's start-up: a process that has imported torch
(1.6 s of every script's 1.9 s start here) forks one child per command (conftest.run_script).

The child is what `python SCRIPT ARGV` would be: its own process, the request's environment,
working directory and argv, sys.path as a fresh interpreter's with the script's directory
first, the script run as `__main__`, stdout and stderr to the files named, exit status as
`sys.exit` (an uncaught exception: traceback and 1; uncaught Ctrl-C: killed by SIGINT),
atexit handlers and non-daemon threads finished. Only modules that read no environment at
import are preloaded (minari's huggingface_hub reads HF_HUB_OFFLINE, so it is left out).

Protocol, one JSON object per line: a request on stdin {script, path (absolute), argv, env,
cwd, sys_path, stdout, stderr}; on the reply pipe {"pid": N}, then {"returncode": R}
(negative: killed by signal -R, as subprocess). EOF on stdin ends the server.
"""

import io
import json
import os
import sys

PRELOAD = ("torch", "numpy", "gymnasium", "tyro")


def run_as_main(request: dict) -> int:
    """In the forked child: set the process up as `python SCRIPT ARGV`, run it, its status."""
    import atexit
    import runpy
    import signal
    import threading
    import traceback

    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, fd)
        os.close(out)
    # unbuffered, as PYTHONUNBUFFERED=1 (script_env) makes a fresh interpreter's streams
    stream = lambda fd, errors: io.TextIOWrapper(
        io.FileIO(fd, "w", closefd=False), encoding="utf-8", errors=errors,
        line_buffering=True, write_through=True)
    sys.stdout, sys.stderr = stream(1, "strict"), stream(2, "backslashreplace")
    sys.argv = [request["script"], *request["argv"]]
    sys.path[:] = request["sys_path"]
    code: int = 0
    try:
        runpy.run_path(request["path"], run_name="__main__")  # absolute, as __file__ is
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        code = -signal.SIGINT
    except BaseException:  # noqa: BLE001 - as the interpreter: print it, exit 1
        traceback.print_exc()
        code = 1
    threading._shutdown()  # the interpreter joins non-daemon threads, then runs atexit
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


def serve() -> None:
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # nothing the preloaded modules print can reach the reply pipe
    for module in PRELOAD:
        __import__(module)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the child never returns to this loop
            code = 1
            try:
                reply.close()
                code = run_as_main(request)
            finally:
                os._exit(code)
        print(json.dumps({"pid": pid}), file=reply)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), file=reply)


if __name__ == "__main__":
    serve()
