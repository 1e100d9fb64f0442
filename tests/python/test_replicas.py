"""Many replicas on loopback: three gym-serve servers, concurrent multi-turn
sessions routed the way NeMo Gym routes a `base_url` list and through
vllm-router (session-sticky policies), a coordinated weight push every
second. Checked: every session stays on one replica; each response's
tokens come from the versions its `weight_versions` spans name (re-scored
on reference servers holding each set of weights); after every push all
replicas report the new version, and no request sent after a push is
answered by older weights."""
import os
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from fleet import Fleet, Router, http, make_model, router_binary, version_spans  # noqa: E402
from gym_affinity import SessionAffinity, replica_index  # noqa: E402

REPLICAS = 3
SESSIONS = 9
TURNS = 3
PUSH_EVERY = 1.0
MIN_PUSHES = 3  # sessions keep starting new conversations until this many pushes landed


@pytest.fixture(scope="module")
def checkpoints():
    """Two checkpoints that differ only in their weights: version vK serves weights[K % 2]."""
    work = tempfile.mkdtemp()
    return [make_model(os.path.join(work, f"w{i}"), seed=40 + i) for i in range(2)]


def weights_of(checkpoints, version):
    return checkpoints[int(version.removeprefix("v")) % 2]


def test_affinity_is_nemo_gyms_rule():
    # sha256("abc") is the FIPS 180-2 test vector ba7816bf8f01cfea...; Gym takes
    # the first 8 bytes big-endian, modulo the number of base URLs.
    first8 = int("ba7816bf8f01cfea", 16)
    assert [replica_index("abc", n) for n in (1, 2, 3, 7)] == [first8 % n for n in (1, 2, 3, 7)]
    affinity = SessionAffinity(["http://a", "http://b", "http://c"])
    assert affinity.url_for("abc") == ["http://a", "http://b", "http://c"][first8 % 3]
    with pytest.raises(ValueError):
        SessionAffinity([])


class Pusher(threading.Thread):
    """Pushes v1, v2, ... to every replica every PUSH_EVERY seconds (alternating
    `keep` and `wait`), and after each push checks that all replicas report it."""

    def __init__(self, fleet, checkpoints):
        super().__init__(daemon=True)
        self.fleet, self.checkpoints = fleet, checkpoints
        self.done = threading.Event()
        self.pushes = []  # (version, started, finished) in monotonic seconds
        self.error = None

    def run(self):
        try:
            k = 0
            while not self.done.wait(PUSH_EVERY):
                k += 1
                version = f"v{k}"
                started = time.monotonic()
                self.fleet.push(os.path.join(weights_of(self.checkpoints, version), "model.safetensors"), version,
                                pause="keep" if k % 2 else "wait")
                finished = time.monotonic()
                assert self.fleet.versions() == [version] * REPLICAS, (version, self.fleet.versions())
                self.pushes.append((version, started, finished))
        except BaseException as e:  # reported by the test thread
            self.error = e


def run_session(base_url, session_id, headers, turns, log):
    """A multi-turn chat that sends back the exact tokens of earlier turns."""
    messages = [{"role": "user", "content": f"Session {session_id}: tell me a story."}]
    for turn in range(turns):
        body = {"model": "tiny", "messages": messages, "max_tokens": 16, "temperature": 1.0,
                "seed": zlib.crc32(f"{session_id}/{turn}".encode()) % 1000, "ignore_eos": True}
        sent = time.monotonic()
        response = http("POST", f"{base_url}/v1/chat/completions", body, headers=headers)
        log.append((session_id, turn, sent, response))
        message = response["choices"][0]["message"]
        messages.append({"role": "assistant", "content": message["content"],
                         "prompt_token_ids": message["prompt_token_ids"],
                         "generation_token_ids": message["generation_token_ids"],
                         "generation_log_probs": message["generation_log_probs"]})
        messages.append({"role": "user", "content": f"And then? ({turn})"})


def check_versions(log, pushes, checkpoints):
    """Every token's log-prob is what the weights of the version naming it give
    (re-scored on a fresh server per checkpoint); no request sent after a push
    finished is answered by an older version. Returns how many responses
    crossed a push."""
    order = {"v0": 0, **{v: i + 1 for i, (v, _, _) in enumerate(pushes)}}
    scoring = []  # (reference index, request, served log-probs, what)
    crossed = 0
    for session_id, turn, sent, response in log:
        message = response["choices"][0]["message"]
        prompt, generated = message["prompt_token_ids"], message["generation_token_ids"]
        spans = version_spans(response)
        assert spans[0][1] == 0 and spans[-1][2] == len(generated), spans
        assert all(a[2] == b[1] for a, b in zip(spans, spans[1:])), spans
        assert [order[v] for v, _, _ in spans] == sorted(order[v] for v, _, _ in spans), spans
        assert response["weight_version"] == spans[0][0]
        crossed += len(spans) > 1
        done_before = [v for v, _, finished in pushes if finished < sent]
        if done_before:
            assert order[spans[0][0]] >= order[done_before[-1]], (session_id, turn, spans, done_before[-1])
        for version, start, end in spans:
            request = {"token_ids": prompt + generated[:end], "start": len(prompt) + start, "temperature": 1.0}
            scoring.append((checkpoints.index(weights_of(checkpoints, version)), request,
                            message["generation_log_probs"][start:end], (session_id, turn, version)))
    references = [Fleet(c, 1, version="reference") for c in checkpoints]
    try:
        def score(item):
            reference, request, served, what = item
            scored = http("POST", f"{references[reference].urls[0]}/v1/logprobs", request)["token_logprobs"]
            assert max(abs(a - b) for a, b in zip(scored, served)) < 1e-3, what

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(score, scoring))
    finally:
        for r in references:
            r.stop()
    return crossed


def run_fleet(checkpoints, route):
    """Start the fleet, pin each session to a replica (first turn, sequentially),
    then run the other turns concurrently under pushes. `route(fleet)` gives
    (base URL for a session, its headers, a context to stop)."""
    fleet = Fleet(checkpoints[0], REPLICAS)
    stop = None
    try:
        url_for, headers_for, stop = route(fleet)
        sessions = [f"session-{i:02d}" for i in range(SESSIONS)]
        log, home = [], {}
        for s in sessions:  # the first turn learns where each session lives
            before = fleet.chat_counts()
            run_session(url_for(s), s, headers_for(s), 1, log)
            home[s] = [i for i, (a, b) in enumerate(zip(before, fleet.chat_counts())) if a != b]
            assert len(home[s]) == 1, (s, home[s])
        t0 = time.monotonic()
        before = fleet.chat_counts()
        pusher = Pusher(fleet, checkpoints)
        pusher.start()
        deadline = time.monotonic() + 120

        def keep_talking(s):
            turns = 0
            while not turns or (len(pusher.pushes) < MIN_PUSHES and not pusher.error and time.monotonic() < deadline):
                run_session(url_for(s), s, headers_for(s), TURNS, log)
                turns += TURNS
            return turns

        with ThreadPoolExecutor(SESSIONS) as pool:
            turns = dict(zip(sessions, pool.map(keep_talking, sessions)))
        pusher.done.set()
        pusher.join()
        if pusher.error:
            raise pusher.error
        assert len(pusher.pushes) >= MIN_PUSHES, "the sessions did not run through enough pushes"
        # Sticky: each replica answered exactly the turns of the sessions it holds.
        expected = [sum(turns[s] for s in sessions if home[s] == [i]) for i in range(REPLICAS)]
        assert [b - a for a, b in zip(before, fleet.chat_counts())] == expected
        t1 = time.monotonic()
        crossed = check_versions(log, pusher.pushes, checkpoints)
        print(f"{len(log)} responses, {crossed} crossed a push, turns per replica {expected}; sessions {t1 - t0:.1f} s,"
              f" check {time.monotonic() - t1:.1f} s, push seconds {[round(f - s, 2) for _, s, f in pusher.pushes]}")
        return home
    finally:
        if stop:
            stop()
        fleet.stop()


def test_gym_base_url_list_under_pushes(checkpoints):
    def route(fleet):
        affinity = SessionAffinity(fleet.urls)
        return affinity.url_for, lambda s: {}, None

    home = run_fleet(checkpoints, route)
    # The replica each session landed on is the one NeMo Gym's rule names.
    assert all(home[s] == [replica_index(s, REPLICAS)] for s in home)


@pytest.mark.parametrize("policy", ["consistent_hash", "sticky_least_loaded"])
def test_vllm_router_session_sticky_under_pushes(checkpoints, policy, tmp_path):
    binary = router_binary()
    if binary is None:
        if os.environ.get("GYM_SERVE_REQUIRE_ROUTER"):
            pytest.fail("vllm-router not found (pip install vllm-router==0.1.17)")
        pytest.skip("vllm-router not installed (pip install vllm-router==0.1.17)")

    def route(fleet):
        router = Router(binary, fleet.urls, policy, tmp_path / "router.log")
        return lambda s: router.url, lambda s: {"X-Session-ID": s}, router.stop

    home = run_fleet(checkpoints, route)
    if policy == "sticky_least_loaded":  # new sessions go to the replica holding fewest
        assert sorted(sum(1 for h in home.values() if h == [i]) for i in range(REPLICAS)) == [3, 3, 3]
