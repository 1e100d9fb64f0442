"""Start gym-serve replicas as child processes and wait until they serve.

Used by `ray_replicas.py` (inside each Ray actor) and by the fleet tests. The
server prints `gym-serve listening on URL` on stdout once it is bound, so
`--port 0` works: the kernel picks a free port and we read it back.
"""
import ctypes
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

READY_PREFIX = "gym-serve listening on "


def _die_with_parent():
    # Linux: the server gets SIGTERM when the process that started it dies
    # (a Ray actor killed with ray.kill never runs its cleanup code).
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Replica:
    """One running gym-serve process and the base URL it bound."""

    def __init__(self, binary, model, host="127.0.0.1", port=0, args=(), env=None, log=None):
        command = [binary, "--model", model, "--host", host, "--port", str(port), *args]
        # The server's log goes to `log` (a file), or to a temporary file so a
        # failed start can say why.
        self.log = log if log is not None else tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
                                     preexec_fn=_die_with_parent)
        line = self.proc.stdout.readline().strip()
        if not line.startswith(READY_PREFIX):
            self.proc.kill()
            self.proc.wait()
            tail = ""
            if log is None:
                self.log.seek(0)
                tail = self.log.read()[:2000]
            raise RuntimeError(f"gym-serve did not start (exit {self.proc.returncode}): {line!r}\n{tail}")
        self.url = line.removeprefix(READY_PREFIX)

    def stop(self, timeout=30):
        """SIGTERM (in-flight requests finish), then SIGKILL after `timeout` seconds."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def wait_healthy(urls, timeout=60.0):
    """Block until `GET /health` answers 200 on every URL; raise TimeoutError naming the others."""
    deadline = time.monotonic() + timeout
    pending = list(urls)
    while pending:
        still = []
        for url in pending:
            try:
                with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=5) as r:
                    if r.status != 200:
                        still.append(url)
            except (urllib.error.URLError, OSError):
                still.append(url)
        pending = still
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"not healthy after {timeout}s: {', '.join(pending)}")
        if pending:
            time.sleep(0.2)
