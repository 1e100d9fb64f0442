#!/usr/bin/env python3
"""Push a PyTorch state_dict to one or several running gym-serve servers.

This is what a TRL / veRL / custom-loop user calls after `optimizer.step()`
(for a LoRA run, `push_adapter_state_dict(get_peft_model_state_dict(model), urls,
adapter="policy", config=model.peft_config["default"])` pushes just the adapter):

    from push_from_pytorch import push_state_dict
    push_state_dict(model.state_dict(), ["http://127.0.0.1:8000"], version=str(step))

The state dict is sent as one safetensors body (bf16 by default; the server
converts to its run dtype) with its SHA-256, so each server applies it all or
nothing. With several URLs the fleet does too: the body is staged on every
server in parallel (`POST /v1/weights/stage`), committed on all of them only
when every stage succeeded (`POST /v1/weights/commit`), and aborted wherever
it staged otherwise (`POST /v1/weights/abort`); a `FleetPushError` then says
why and which server serves which version (pushing again converges them when
a server was lost between the two phases). As a demo, run it against a server started on a `make-model`
checkpoint: it loads that checkpoint with transformers, nudges every weight as
an optimizer step would, and pushes the result.

    python examples/push_from_pytorch.py --model models/out/tiny --url http://127.0.0.1:8000
"""
import argparse
import hashlib
import json
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch
from safetensors.torch import save


class FleetPushError(RuntimeError):
    """A push that did not land on every server. `errors` maps each server that
    failed to why; `serving` maps every server to the version it serves after
    the push (None where it did not answer)."""

    def __init__(self, message, errors, serving):
        lines = [message] + [f"{url}: {why}" for url, why in errors.items()]
        super().__init__("\n".join(lines))
        self.errors = errors
        self.serving = serving


def _base(url):
    return url.rstrip("/").removesuffix("/v1")


def _call(method, url, path, query=None, body=None, headers=None, admin_key=None, timeout=600):
    """`method {url}{path}?{query}`'s JSON answer; a refusal or a connection
    failure raises a RuntimeError naming the server."""
    target = f"{_base(url)}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    request = urllib.request.Request(target, data=body, method=method, headers=headers or {})
    if admin_key:
        request.add_header("Authorization", f"Bearer {admin_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{url} answered {e.code}: {e.read()[:1000].decode(errors='replace')}") from None
    except (urllib.error.URLError, OSError) as e:
        raise RuntimeError(f"{url} could not be reached: {e}") from None


def _each(pool, work, items):
    """[(True, answer) or (False, error message)] of `work(item)` for each item, in parallel."""
    def attempt(item):
        try:
            return True, work(item)
        except RuntimeError as e:
            return False, str(e)
    return list(pool.map(attempt, items))


def push_state_dict(state_dict, urls, version=None, pause="wait", partial=False, admin_key=None,
                    dtype=torch.bfloat16, timeout=600):
    """Push `state_dict` to every server in `urls`, all or nothing across them;
    returns their answers (`weight_version`, `tensors`, `bytes`, `seconds`).
    One URL gets a plain `POST /v1/weights`; several get staged, then committed."""
    # clone(): tied parameters share storage, which safetensors refuses to save.
    tensors = {name: t.detach().to(dtype).cpu().contiguous().clone() for name, t in state_dict.items()}
    body = save(tensors)
    headers = {"Content-Type": "application/octet-stream", "x-weights-sha256": hashlib.sha256(body).hexdigest()}
    query = {"mode": "partial" if partial else "full", "pause": pause}
    if version is not None:
        query["version"] = str(version)
    if len(urls) == 1:
        return [_call("POST", urls[0], "/v1/weights", query, body, headers, admin_key, timeout)]

    def small(method, url, path, q=None):
        return _call(method, url, path, q, b"" if method == "POST" else None, None, admin_key, min(timeout, 300))

    def serving():
        def version_of(url):
            try:
                return small("GET", url, "/get_weight_version")["weight_version"]
            except RuntimeError:
                return None
        return dict(zip(urls, pool.map(version_of, urls)))

    with ThreadPoolExecutor(max_workers=len(urls)) as pool:
        staged = _each(pool, lambda u: _call("POST", u, "/v1/weights/stage", query, body, headers, admin_key,
                                             timeout), urls)
        errors = {u: why for u, (ok, why) in zip(urls, staged) if not ok}
        versions = {answer["version"] for ok, answer in staged if ok}
        if errors or len(versions) > 1:
            held = [(u, answer["id"]) for u, (ok, answer) in zip(urls, staged) if ok]
            _each(pool, lambda h: small("POST", h[0], "/v1/weights/abort", {"id": h[1]}), held)
            if not errors:
                errors = {u: f"would serve {answer['version']}" for u, (_, answer) in zip(urls, staged)}
                message = "the servers would serve different versions (pass version=); nothing was committed"
            else:
                message = "no server changed weights: a stage failed, and the others were aborted"
            raise FleetPushError(message, errors, serving())
        ids = [answer["id"] for _, answer in staged]
        committed = _each(pool, lambda ui: small("POST", ui[0], "/v1/weights/commit", {"id": ui[1], "pause": pause}),
                          list(zip(urls, ids)))
        errors = {u: why for u, (ok, why) in zip(urls, committed) if not ok}
        if errors:
            # A commit that failed may have left its stage held: drop it.
            lost = [(u, i) for u, i, (ok, _) in zip(urls, ids, committed) if not ok]
            _each(pool, lambda h: small("POST", h[0], "/v1/weights/abort", {"id": h[1]}), lost)
            raise FleetPushError(f"committed on {len(urls) - len(errors)} of {len(urls)} servers; push again to "
                                 "converge them", errors, serving())
        return [answer for _, answer in committed]


def push_adapter_state_dict(state_dict, urls, adapter, config=None, version=None, pause="wait", admin_key=None,
                            dtype=torch.float32, timeout=600):
    """POST a PEFT adapter's state dict (`peft.get_peft_model_state_dict(model)`) to
    `{url}/v1/weights?adapter=NAME` on every server: it replaces adapter NAME all or
    nothing (or creates it; then `config`, the adapter's `LoraConfig`, is required)
    on each server, not across them (adapters have no staged phase): one failure
    raises, and the servers that took it serve the new adapter."""
    tensors = {name: t.detach().to(dtype).cpu().contiguous().clone() for name, t in state_dict.items()}
    body = save(tensors)
    query = {"adapter": adapter, "pause": pause}
    if version is not None:
        query["version"] = str(version)
    headers = {"Content-Type": "application/octet-stream"}
    if config is not None:
        cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        # target_modules may be a set; enums (task_type, peft_type) print as their values.
        headers["x-adapter-config"] = json.dumps(cfg, default=lambda v: sorted(v) if isinstance(v, set) else str(
            getattr(v, "value", v)))

    def push(url):
        base = url.rstrip("/").removesuffix("/v1")
        request = urllib.request.Request(f"{base}/v1/weights?{urllib.parse.urlencode(query)}", data=body,
                                         method="POST", headers=headers)
        if admin_key:
            request.add_header("Authorization", f"Bearer {admin_key}")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)

    with ThreadPoolExecutor(max_workers=len(urls)) as pool:
        return list(pool.map(push, urls))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint directory the server was started on")
    parser.add_argument("--url", action="append", required=True, help="server base URL (repeat for several)")
    parser.add_argument("--version", default=None)
    parser.add_argument("--admin-key", default=None)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    with torch.no_grad():  # stand-in for optimizer.step()
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    for answer in push_state_dict(model.state_dict(), args.url, version=args.version, admin_key=args.admin_key):
        print(json.dumps(answer))


if __name__ == "__main__":
    main()
