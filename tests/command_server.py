"""Run README's commands in forked copies of one Python process that has imported the toolkit once.

Every ``ddlm-*`` command (and ``python scripts/X.py`` or ``python file.py``) otherwise spends 3-5 s of its run
importing torch, transformers and the toolkit before doing a few seconds of work.  This server imports them
once, then for each request forks a child that does what the command's own process would do: change to the
folder, send stdout/stderr to the given files, set ``sys.argv``, run the console script's entry point (or the
file as ``__main__``), run the ``atexit`` handlers and exit with the command's code.  The parent runs no torch
operation before forking, so no thread pool is copied into the children.

Protocol (one JSON object per line): request ``{"argv", "cwd", "stdout", "stderr"}``; answers ``{"pid": N}`` at
once, then ``{"code": C}`` when the child ends.  :class:`CommandServer` is the test side.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

ENTRY_GROUP = "console_scripts"


def _entry_points() -> dict:
    from importlib.metadata import entry_points

    return {e.name: e for e in entry_points(group=ENTRY_GROUP) if e.name.startswith("ddlm-")}


def _child(request: dict, commands: dict) -> None:
    """In the forked child: run one command, never return."""
    code = 1
    try:
        # A real command starts with the terminal's stdin or nothing; give it /dev/null, never the request pipe.
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        sys.stdin = open(0, closefd=False)
        os.chdir(request["cwd"])
        for fd, name in ((1, "stdout"), (2, "stderr")):
            target = os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        argv = request["argv"]
        try:
            if argv[0] in commands:
                sys.argv = [argv[0], *argv[1:]]
                result = commands[argv[0]].load()()
            else:  # python FILE args...
                import runpy

                sys.argv = argv[1:]
                sys.path.insert(0, str(Path(argv[1]).resolve().parent))
                runpy.run_path(argv[1], run_name="__main__")
                result = 0
            code = result if isinstance(result, int) else (0 if result is None else 1)
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            if not isinstance(stop.code, (int, type(None))):
                print(stop.code, file=sys.stderr)
        except KeyboardInterrupt:
            code = 130
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        import atexit
        import threading

        threading._shutdown()  # as the interpreter does: join non-daemon threads before the exit handlers
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def serve() -> None:
    """Import the toolkit and every ``ddlm-*`` entry point, then answer requests on stdin until it closes."""
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path.pop(0)  # a console script's process does not see tests/
    import matplotlib

    matplotlib.use("Agg")
    commands = _entry_points()
    for entry in commands.values():
        entry.load()
    import diffusion.evaluation.run_plot  # noqa: F401
    import matplotlib.pyplot  # noqa: F401
    out = sys.stdout
    print(json.dumps({"ready": sorted(commands)}), file=out, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request, commands)
        print(json.dumps({"pid": pid}), file=out, flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), file=out, flush=True)


class CommandServer:
    """The test side: start the server with ``env``, then :meth:`run` argv lists as a subprocess would."""

    def __init__(self, env: dict, scratch: Path) -> None:
        self.scratch = scratch
        self.process = subprocess.Popen([sys.executable, __file__], env=env, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, start_new_session=True)
        self.pending = b""  # bytes read from the server past the last whole line
        try:
            self.commands = set(self._read(300)["ready"])
        except BaseException:
            self._kill()
            raise
        self.count = 0

    def _read(self, timeout: float) -> dict:
        """The server's next answer line, read from the raw pipe (a buffered reader could hold a second line
        that ``select`` then never reports)."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.pending:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.process.stdout], [], [], max(left, 0))
            if not ready:
                raise TimeoutError(f"the command server did not answer within {timeout} s")
            chunk = os.read(self.process.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"the command server ended (code {self.process.wait()})")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)

    def runs(self, argv: list[str]) -> bool:
        """Whether :meth:`run` takes this command (a ``ddlm-*`` entry point or a Python file)."""
        return argv[0] in self.commands or (argv[0] == "python" and len(argv) > 1 and argv[1].endswith(".py"))

    def run(self, argv: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
        self.count += 1
        out, err = self.scratch / f"cmd{self.count}.out", self.scratch / f"cmd{self.count}.err"
        self.process.stdin.write((json.dumps({"argv": argv, "cwd": str(cwd), "stdout": str(out),
                                              "stderr": str(err)}) + "\n").encode())
        self.process.stdin.flush()
        pid = self._read(30)["pid"]
        try:
            code = self._read(timeout)["code"]
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)  # not yet reaped: the server waits for it before it answers
            self._read(30)
            raise
        return subprocess.CompletedProcess(argv, code, out.read_text(errors="replace"), err.read_text(errors="replace"))

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._kill()

    def _kill(self) -> None:
        """The server and any child it runs (one session)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


if __name__ == "__main__":
    serve()
