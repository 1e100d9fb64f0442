"""Starting (or connecting to) the gym-serve replicas the loop generates with and pushes to."""
import json
import os
import subprocess
import time
import urllib.request
from contextlib import contextmanager


def ensure_model(server):
    """Make the served checkpoint with `gym-serve make-model` when it does not exist yet."""
    if os.path.exists(os.path.join(server.model, "config.json")):
        return
    if server.make_model is None:
        raise FileNotFoundError(f"{server.model} has no config.json and server.make_model is not set")
    subprocess.run([server.binary, "make-model", "--out", server.model, *map(str, server.make_model)],
                   check=True, capture_output=True)


def start_replica(server):
    args = [server.binary, "--model", server.model, "--port", "0",
            "--served-model-name", server.served_model_name, *map(str, server.args)]
    if server.api_key:
        args += ["--api-key", server.api_key]
    if server.admin_api_key:
        args += ["--admin-api-key", server.admin_api_key]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline().strip()
    if not line.startswith("gym-serve listening on "):
        proc.kill()
        raise RuntimeError(f"gym-serve did not start: {line!r} (exit {proc.wait()})")
    return proc, line.removeprefix("gym-serve listening on ")


def weight_version(url, admin_key=None, timeout=60):
    request = urllib.request.Request(f"{url}/get_weight_version")
    if admin_key:
        request.add_header("Authorization", f"Bearer {admin_key}")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return json.load(r)["weight_version"]
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@contextmanager
def replicas(server):
    """Yields the replicas' base URLs; stops the ones it started."""
    procs = []
    try:
        if server.urls:
            urls = [u.rstrip("/").removesuffix("/v1") for u in server.urls]
        else:
            ensure_model(server)
            for _ in range(server.replicas):
                procs.append(start_replica(server))
            urls = [url for _, url in procs]
        versions = {weight_version(u, server.admin_api_key or server.api_key) for u in urls}
        if len(versions) != 1:
            raise RuntimeError(f"replicas serve different weight versions {sorted(versions)}: push the same weights first")
        yield urls
    finally:
        for proc, _ in procs:
            proc.terminate()
        for proc, _ in procs:
            proc.wait(timeout=30)
