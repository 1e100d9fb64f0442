#!/usr/bin/env python3
"""Push a PyTorch state_dict to one or several running gym-serve servers.

This is what a TRL / veRL / custom-loop user calls after `optimizer.step()`
(for a LoRA run, `push_adapter_state_dict(get_peft_model_state_dict(model), urls,
adapter="policy", config=model.peft_config["default"])` pushes just the adapter):

    from push_from_pytorch import push_state_dict
    push_state_dict(model.state_dict(), ["http://127.0.0.1:8000"], version=str(step))

The state dict is sent as one safetensors body (bf16 by default; the server
converts to its run dtype) with its SHA-256, so each server applies it all or
nothing. As a demo, run it against a server started on a `make-model`
checkpoint: it loads that checkpoint with transformers, nudges every weight as
an optimizer step would, and pushes the result.

    python examples/push_from_pytorch.py --model models/out/tiny --url http://127.0.0.1:8000
"""
import argparse
import hashlib
import json
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch
from safetensors.torch import save


def push_state_dict(state_dict, urls, version=None, pause="wait", partial=False, admin_key=None,
                    dtype=torch.bfloat16, timeout=600):
    """POST `state_dict` to `{url}/v1/weights` on every server; returns their answers."""
    # clone(): tied parameters share storage, which safetensors refuses to save.
    tensors = {name: t.detach().to(dtype).cpu().contiguous().clone() for name, t in state_dict.items()}
    body = save(tensors)
    digest = hashlib.sha256(body).hexdigest()
    query = {"mode": "partial" if partial else "full", "pause": pause}
    if version is not None:
        query["version"] = str(version)

    def push(url):
        base = url.rstrip("/").removesuffix("/v1")
        request = urllib.request.Request(
            f"{base}/v1/weights?{urllib.parse.urlencode(query)}", data=body, method="POST",
            headers={"Content-Type": "application/octet-stream", "x-weights-sha256": digest})
        if admin_key:
            request.add_header("Authorization", f"Bearer {admin_key}")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)

    with ThreadPoolExecutor(max_workers=len(urls)) as pool:
        return list(pool.map(push, urls))


def push_adapter_state_dict(state_dict, urls, adapter, config=None, version=None, pause="wait", admin_key=None,
                            dtype=torch.float32, timeout=600):
    """POST a PEFT adapter's state dict (`peft.get_peft_model_state_dict(model)`) to
    `{url}/v1/weights?adapter=NAME` on every server: it replaces adapter NAME all or
    nothing (or creates it; then `config`, the adapter's `LoraConfig`, is required)."""
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
