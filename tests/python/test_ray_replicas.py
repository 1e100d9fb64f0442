"""examples/replicas/ray_replicas.py on a local single-node Ray instance:
two replicas bound to 127.0.0.1 come up, serve, are named in the Gym config
snippet, and go away when the driver gets SIGTERM.

Opt-in: needs `ray` in the Python running pytest (about 240 MB installed and
a minute to install; starting Ray takes 10-30 s), so CI's venv does not have
it and this test skips there. Run it with
`pip install ray pytest` in a venv, then
`GYM_SERVE_BIN=target/debug/gym-serve VENV/bin/python -m pytest tests/python/test_ray_replicas.py`."""
import os
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from fleet import BIN, http, make_model  # noqa: E402

pytest.importorskip("ray")
EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "replicas", "ray_replicas.py")


def test_ray_places_replicas_and_hands_out_urls():
    work = tempfile.mkdtemp()
    model = make_model(os.path.join(work, "tiny"), seed=5)
    config = os.path.join(work, "gym.yaml")
    driver = subprocess.Popen(
        [sys.executable, EXAMPLE, "--address", "local", "--placement", "SPREAD", "--replicas", "2",
         "--host", "127.0.0.1", "--port", "0", "--binary", os.path.abspath(BIN), "--model", model,
         "--gym-config", config, "--ready-timeout", "240", "--", "--served-model-name", "policy"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    urls = []
    try:
        for line in driver.stdout:
            if line.startswith("replica "):
                urls.append(line.split(": ", 1)[1].strip())
            if line.strip() == "replicas ready":
                break
        assert len(urls) == 2 and len(set(urls)) == 2, urls
        assert all(u.startswith("http://127.0.0.1:") for u in urls), urls
        with open(config) as f:
            snippet = f.read()
        assert [line.strip().removeprefix("- ") for line in snippet.splitlines() if line.strip().startswith("- ")] \
            == [f"{u}/v1" for u in urls]
        assert "model: policy" in snippet
        for u in urls:
            answer = http("POST", f"{u}/v1/chat/completions",
                          {"model": "policy", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
            assert len(answer["choices"][0]["message"]["generation_token_ids"]) == 4
    finally:
        driver.send_signal(signal.SIGTERM)
        assert driver.wait(timeout=120) == 0
    for u in urls:  # the replicas went with the driver
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"{u}/health", timeout=5)
