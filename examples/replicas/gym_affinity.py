"""NeMo Gym's session -> replica rule for a `base_url` list, for clients outside Gym.

NeMo Gym's `vllm_model` server (responses_api_models/vllm_model/app.py,
`_resolve_client`, as in the nemo-gym 0.7.0 wheel; since
NVIDIA-NeMo/Gym@c84b7ed4b) sends every turn of a session to one entry of its
`base_url` list:

    digest = sha256(session_id.encode("utf-8")).digest()
    index = int.from_bytes(digest[:8], "big") % len(base_urls)

`session_id` is the Gym session's id (a `uuid4()` string kept in the session
cookie). Releases up to 0.5 assigned sessions round-robin in the order they
were first seen, which no outside client can reproduce. Use this module to
send your own traffic (evaluation, a custom agent loop, tests) to the replica
Gym would pick, so prefix caches stay warm and a session never changes replica.
"""
import hashlib


def replica_index(session_id: str, replicas: int) -> int:
    """The index NeMo Gym picks for `session_id` among `replicas` base URLs."""
    if replicas < 1:
        raise ValueError("need at least one replica")
    digest = hashlib.sha256(session_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], byteorder="big") % replicas


class SessionAffinity:
    """Maps session ids to base URLs the way NeMo Gym's `vllm_model` does."""

    def __init__(self, base_urls):
        self.base_urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        if not self.base_urls:
            raise ValueError("need at least one base URL")

    def url_for(self, session_id: str) -> str:
        return self.base_urls[replica_index(session_id, len(self.base_urls))]
