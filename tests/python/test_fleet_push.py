"""One weight push across three replicas is all or nothing: when one replica
gets a corrupt body (a proxy flips a byte of its copy) or is down, no replica
changes weights or version; the same push without the fault then lands on
every replica. A replica that dies between the stage and the commit leaves
the others committed: the push fails, says which replica serves which
version, and the same push again (to the restarted replica) converges them.
`--chain` (the body sent once, each replica passing it on) keeps the same
all-or-nothing: a body corrupted between two replicas lands on none."""
import os
import subprocess
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from fleet import BIN, CorruptingProxy, CuttingProxy, Fleet, http, make_model, push_weights_takes_many_urls  # noqa: E402

# Until the two-phase `push-weights --url A --url B ...` (issue 17, item 2) is in this build.
pytestmark = pytest.mark.skipif(not push_weights_takes_many_urls(), reason="push-weights takes one --url")

GREEDY = {"prompt": [1, 5, 9, 13, 17], "max_tokens": 8, "temperature": 0.0}


@pytest.fixture(scope="module")
def checkpoints():
    work = tempfile.mkdtemp()
    return [make_model(os.path.join(work, f"w{i}"), seed=60 + i) for i in range(2)]


def push(urls, weights, version, extra=()):
    command = [BIN, "push-weights", "--file", os.path.join(weights, "model.safetensors"), "--version", version,
               *extra]
    for u in urls:
        command += ["--url", u]
    return subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RUST_BACKTRACE": "0"})


def greedy(urls):
    return [http("POST", f"{u}/v1/completions", GREEDY)["choices"][0]["generation_log_probs"] for u in urls]


def assert_untouched(fleet, before):
    assert fleet.versions() == ["v0"] * len(fleet.urls)
    assert greedy(fleet.urls) == before  # bit for bit the weights they had


@pytest.fixture
def fleet(checkpoints):
    f = Fleet(checkpoints[0], 3)
    yield f
    f.stop()


def test_corrupt_body_for_one_replica_changes_no_replica(fleet, checkpoints):
    before = greedy(fleet.urls)
    proxy = CorruptingProxy(fleet.urls[2])
    try:
        result = push(fleet.urls[:2] + [proxy.url], checkpoints[1], "v1")
    finally:
        proxy.stop()
    assert proxy.corrupted == 1
    assert result.returncode != 0, result.stdout
    assert proxy.url in result.stdout + result.stderr  # the report names the replica that refused
    assert_untouched(fleet, before)
    # Nothing stays staged: the same push without the fault lands everywhere.
    result = push(fleet.urls, checkpoints[1], "v1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert fleet.versions() == ["v1"] * 3
    after = greedy(fleet.urls)
    assert after[0] == after[1] == after[2] and after[0] != before[0]


def test_push_with_one_replica_down_changes_no_replica(fleet, checkpoints):
    before = greedy(fleet.urls[:2])
    fleet.replicas[2].stop()
    dead = fleet.urls[2]
    result = push(fleet.urls, checkpoints[1], "v1")
    assert result.returncode != 0, result.stdout
    assert dead in result.stdout + result.stderr
    assert [http("GET", f"{u}/get_weight_version")["weight_version"] for u in fleet.urls[:2]] == ["v0", "v0"]
    assert greedy(fleet.urls[:2]) == before


def test_replica_dying_before_its_commit_is_reported_and_a_rerun_converges(fleet, checkpoints):
    before = greedy(fleet.urls)
    victim = fleet.replicas[2]
    proxy = CuttingProxy(victim.url, "/v1/weights/commit", on_cut=lambda: victim.proc.kill())
    try:
        result = push(fleet.urls[:2] + [proxy.url], checkpoints[1], "v1")
    finally:
        proxy.stop()
    out = result.stdout + result.stderr
    assert proxy.cut == 1, out
    assert result.returncode != 0, out
    # The two live replicas committed; the report names each replica's version.
    assert [http("GET", f"{u}/get_weight_version")["weight_version"] for u in fleet.urls[:2]] == ["v1", "v1"]
    assert "committed on 2 of 3 replicas" in out, out
    for u in fleet.urls[:2]:
        assert f"{u} serves v1" in out, out
    assert f"{proxy.url} serves unreachable" in out, out
    # The replica comes back (on its old weights); the same push converges the fleet.
    victim.proc.wait()
    fleet.replicas[2] = type(victim)(BIN, checkpoints[0], args=["--weight-version", "v0", "--served-model-name", "tiny"])
    fleet.urls[2] = fleet.replicas[2].url
    assert greedy(fleet.urls[2:]) == before[2:]
    result = push(fleet.urls, checkpoints[1], "v1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert fleet.versions() == ["v1"] * 3
    after = greedy(fleet.urls)
    assert after[0] == after[1] == after[2] and after[0] != before[0]
    assert "all 3 replicas serve version v1" in result.stdout


KEY = "fleet-key"


def test_chain_push_is_all_or_nothing(checkpoints):
    fleet = Fleet(checkpoints[0], 3, args=["--admin-api-key", KEY])
    try:
        auth = {"Authorization": f"Bearer {KEY}"}

        def versions(urls):
            return [http("GET", f"{u}/get_weight_version", headers=auth)["weight_version"] for u in urls]

        before = greedy(fleet.urls)
        chain = ["--chain", "--admin-api-key", KEY]
        # The second replica forwards to the third through a proxy that flips a byte.
        proxy = CorruptingProxy(fleet.urls[2])
        try:
            result = push(fleet.urls[:2] + [proxy.url], checkpoints[1], "v1", chain)
        finally:
            proxy.stop()
        out = result.stdout + result.stderr
        assert proxy.corrupted == 1, out
        assert result.returncode != 0, out
        assert proxy.url in out and "checksum mismatch" in out, out
        assert versions(fleet.urls) == ["v0"] * 3
        assert [http("GET", f"{u}/v1/weights/staged", headers=auth)["staged"] for u in fleet.urls] == [None] * 3
        assert greedy(fleet.urls) == before
        result = push(fleet.urls, checkpoints[1], "v1", chain)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "all 3 replicas serve version v1" in result.stdout
        assert versions(fleet.urls) == ["v1"] * 3
        after = greedy(fleet.urls)
        assert after[0] == after[1] == after[2] and after[0] != before[0]
    finally:
        fleet.stop()
