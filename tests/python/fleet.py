"""Test helpers for many gym-serve replicas on loopback: start them, push
weights to all of them, read their versions and request counts, run
vllm-router in front of them, and check a response's versions against
reference servers."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples", "replicas"))
from launch import Replica, wait_healthy  # noqa: E402

BIN = os.environ.get("GYM_SERVE_BIN", "target/debug/gym-serve")


def http(method, url, body=None, headers=None, timeout=120):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
    except urllib.error.HTTPError as e:
        raise AssertionError(f"{method} {url} -> {e.code}: {e.read()[:500]!r}") from None
    return json.loads(raw) if raw and not raw.startswith(b"#") else raw.decode()


def make_model(out_dir, seed):
    subprocess.run([BIN, "make-model", "--out", out_dir, "--seed", str(seed)], check=True, capture_output=True)
    return out_dir


class Fleet:
    """N replicas of one checkpoint, each on its own ephemeral loopback port."""

    def __init__(self, model, n, version="v0", args=()):
        self.replicas = []
        try:
            for _ in range(n):
                self.replicas.append(Replica(BIN, model, args=["--weight-version", version,
                                                              "--served-model-name", "tiny", *args]))
        except BaseException:
            self.stop()
            raise
        self.urls = [r.url for r in self.replicas]
        wait_healthy(self.urls)

    def stop(self):
        for r in self.replicas:
            r.stop()

    def versions(self):
        return [http("GET", f"{u}/get_weight_version")["weight_version"] for u in self.urls]

    def chat_counts(self):
        """Successful chat completions each replica has answered (from /metrics)."""
        pattern = re.compile(r'gym_serve_http_requests_total\{endpoint="/v1/chat/completions",status="200"\} (\d+)')
        counts = []
        for u in self.urls:
            m = pattern.search(http("GET", f"{u}/metrics"))
            counts.append(int(m.group(1)) if m else 0)
        return counts

    def push(self, weights_file, version, pause="wait"):
        """One coordinated push of `weights_file` to every replica: a single
        two-phase `push-weights --url A --url B ...` where this build has it,
        else one push per replica in parallel. Returns seconds taken."""
        started = time.monotonic()
        command = [BIN, "push-weights", "--file", weights_file, "--version", version, "--pause", pause]
        if push_weights_takes_many_urls():
            groups = [sum((["--url", u] for u in self.urls), [])]
        else:
            groups = [["--url", u] for u in self.urls]
        procs = [subprocess.Popen(command + g, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for g in groups]
        outputs = [(p.wait(timeout=120), p.stdout.read()) for p in procs]
        for rc, out in outputs:
            assert rc == 0, out
        return time.monotonic() - started


_MANY_URLS = []


def push_weights_takes_many_urls():
    """Whether this build's `push-weights` accepts `--url` more than once."""
    if not _MANY_URLS:
        probe = subprocess.run([BIN, "push-weights", "--url", "http://127.0.0.1:9", "--url", "http://127.0.0.1:9",
                                "--file", "/nonexistent"], capture_output=True, text=True)
        _MANY_URLS.append("cannot be used multiple times" not in probe.stderr)
    return _MANY_URLS[0]


def router_binary():
    """vllm-router's launcher (PyPI `vllm-router`), from VLLM_ROUTER_BIN, this venv, or PATH."""
    candidates = [os.environ.get("VLLM_ROUTER_BIN"), os.path.join(os.path.dirname(sys.executable), "vllm-router"),
                  shutil.which("vllm-router")]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Router:
    """vllm-router in front of `urls` with `policy`, on loopback."""

    def __init__(self, binary, urls, policy, log_path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [binary, "--host", "127.0.0.1", "--port", str(self.port), "--worker-urls", *urls, "--policy", policy,
             "--prometheus-port", str(free_port()), "--worker-startup-check-interval", "1"],
            stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_healthy([self.url], timeout=60)
        except TimeoutError:
            self.stop()
            raise

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def version_spans(response):
    """[(version, start, end)] over choice 0's generated tokens: its
    `weight_versions` spans, or one span of `weight_version` when it has none."""
    choice = response["choices"][0]
    n = len(choice["message"]["generation_token_ids"])
    spans = choice.get("weight_versions") or response.get("weight_versions")
    if not spans:
        return [(response["weight_version"], 0, n)]
    return [(s["version"], s["start"], s["end"]) for s in spans]


class _LoopbackProxy:
    """A TCP listener on loopback in front of one replica (`target_url`):
    each accepted connection goes to `_serve(client)` on a thread of its own."""

    def __init__(self, target_url):
        host, port = target_url.removeprefix("http://").rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def start(self):
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def stop(self):
        self.listener.close()


class CorruptingProxy(_LoopbackProxy):
    """A loopback TCP proxy to one replica that flips one byte inside the first
    large request body it forwards (a weight push), and passes everything else
    through: the replica behind it gets a corrupt body while the others get the
    one the client sent."""

    LARGE = 100_000

    def __init__(self, target_url):
        super().__init__(target_url)
        self.corrupted = 0
        self.lock = threading.Lock()
        self.start()

    def _serve(self, client):
        upstream = socket.create_connection(self.target)
        threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
        self._pipe(upstream, client, False)

    def _flip_offset(self, buf, base):
        """Scan request heads in `buf` (stream offset `base`); the offset of the
        byte to flip once a large body starts, else None and what to keep."""
        while (end := buf.find(b"\r\n\r\n")) >= 0:
            head = buf[:end]
            length = re.search(rb"(?i)\ncontent-length:\s*(\d+)", head)
            chunked = re.search(rb"(?i)\ntransfer-encoding:\s*chunked", head)
            if chunked or (length and int(length.group(1)) > self.LARGE):
                return base + end + 4 + 4096, b"", base
            buf, base = buf[end + 4:], base + end + 4
        keep = buf[-65536:]
        return None, keep, base + len(buf) - len(keep)

    def _pipe(self, src, dst, corrupt):
        buf, base, offset, flip_at = b"", 0, 0, None
        try:
            while chunk := src.recv(65536):
                if corrupt and flip_at is None:
                    flip_at, buf, base = self._flip_offset(buf + chunk, base)
                if flip_at is not None and offset <= flip_at < offset + len(chunk):
                    with self.lock:
                        if not self.corrupted:
                            chunk = bytearray(chunk)
                            chunk[flip_at - offset] ^= 0xFF
                            chunk = bytes(chunk)
                        self.corrupted += 1
                offset += len(chunk)
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class CuttingProxy(_LoopbackProxy):
    """A loopback TCP proxy to one replica that passes everything through
    until a request for `path` starts: then it calls `on_cut()` (a test kills
    the replica there) and closes the client's connection without forwarding
    it, as a replica that died between the stage and the commit would."""

    def __init__(self, target_url, path, on_cut):
        super().__init__(target_url)
        self.marker = f" {path}".encode()
        self.on_cut = on_cut
        self.cut = 0
        self.start()

    def _serve(self, client):
        try:
            upstream = socket.create_connection(self.target)
        except OSError:  # the replica is gone: so is this connection
            client.close()
            return
        threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()
        tail = b""
        try:
            while chunk := client.recv(65536):
                if self.marker in tail + chunk:
                    self.cut += 1
                    self.on_cut()
                    break
                tail = chunk[-len(self.marker):]
                upstream.sendall(chunk)
        except OSError:
            pass
        for s in (client, upstream):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    @staticmethod
    def _pipe(src, dst):
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass
        try:  # the replica closed (or died): so does the client's side
            dst.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
