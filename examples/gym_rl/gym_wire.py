"""NeMo Gym's vllm_model server on the wire, for runs without NeMo Gym installed.

With `return_token_id_information: true` Gym's vllm_model server (NeMo Gym
0.7.0, responses_api_models/vllm_model/app.py) turns each model call into a
`POST {base_url}/chat/completions` and reads the answer back as follows; these
functions do the same, so gym-serve sees exactly the traffic Gym sends:

* request: `developer` messages become `system` (with
  `replace_developer_role_with_system`), Responses-style tools become chat
  tools without OpenAI's `strict`, and `logprobs: true, top_logprobs: 0,
  return_tokens_as_token_ids: true` are forced on;
* earlier assistant turns are sent back with their `prompt_token_ids`,
  `generation_token_ids` and `generation_log_probs`, their `<think>` text moved
  to `reasoning_content` and `reasoning` (Gym's default `reasoning_field: both`);
* response: the token bundle on `choices[0].message` is taken, checked against
  the other token sources present (top-level `prompt_token_ids` with
  `choices[0].token_ids`, and the `token_id:N` entries of `logprobs.content`),
  and reasoning is wrapped back into `<think>` tags in the content.
"""
import json
import re

TOKEN_FIELDS = ("prompt_token_ids", "generation_token_ids", "generation_log_probs")
THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


class TokenTransportError(RuntimeError):
    """The server's token fields are missing, partial or disagree (Gym fails the rollout on these)."""


def chat_tools(tools):
    """Responses-style tools ({type, name, parameters, strict, description}) as chat tools."""
    out = []
    for tool in tools or []:
        if tool.get("type") != "function":
            raise ValueError(f"only function tools are supported, not {tool.get('type')!r}")
        function = {k: v for k, v in tool.items() if k not in ("type", "strict")}
        if "function" in tool:  # already in chat form
            function = {k: v for k, v in tool["function"].items() if k != "strict"}
        out.append({"type": "function", "function": function})
    return out


def _text(content):
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content or [])


def input_messages(items, vllm_cfg):
    """A task's Responses `input` (role/content messages) as chat messages."""
    messages = []
    for item in items:
        role = item["role"]
        if role == "developer" and vllm_cfg.get("replace_developer_role_with_system"):
            role = "system"
        messages.append({"role": role, "content": _text(item.get("content"))})
    return messages


def chat_request(messages, tools, vllm_cfg, max_tokens, temperature, seed):
    body = {
        "model": vllm_cfg.get("model", "policy"),
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "seed": seed,
        "logprobs": True,
        "top_logprobs": 0,
        "return_tokens_as_token_ids": True,
    }
    if tools:
        body["tools"] = tools
    if vllm_cfg.get("request_prompt_and_generation_token_ids"):
        body["return_token_ids"] = True
    if vllm_cfg.get("chat_template_kwargs"):
        body["chat_template_kwargs"] = vllm_cfg["chat_template_kwargs"]
    return body


def replay_assistant(turn, vllm_cfg):
    """The assistant message a later request carries for an earlier turn (as Gym rebuilds it)."""
    content = turn["content"] or ""
    message = {"role": "assistant", "content": content}
    if vllm_cfg.get("uses_reasoning_parser"):
        reasoning = THINK.findall(content)
        message["content"] = THINK.sub("", content)
        if reasoning:
            message["reasoning_content"] = reasoning[0]
            message["reasoning"] = reasoning[0]
    if turn["tool_calls"]:
        message["tool_calls"] = [
            {"id": c["call_id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in turn["tool_calls"]
        ]
    message.update({k: turn[k] for k in TOKEN_FIELDS})
    return message


def _logprob_tokens(choice):
    entries = (choice.get("logprobs") or {}).get("content")
    if entries is None:
        return None
    ids = []
    for e in entries:
        token = e.get("token", "")
        if not token.startswith("token_id:"):
            raise TokenTransportError(f"logprobs token {token!r} is not `token_id:N`: return_tokens_as_token_ids ignored")
        ids.append(int(token.removeprefix("token_id:")))
    return ids, [e["logprob"] for e in entries]


def read_choice(response, vllm_cfg):
    """choices[0] of a chat completion as one model turn, its token sources cross-checked."""
    choice = response["choices"][0]
    message = choice["message"]
    present = [k for k in TOKEN_FIELDS if message.get(k) is not None]
    if len(present) != len(TOKEN_FIELDS):
        missing = sorted(set(TOKEN_FIELDS) - set(present))
        raise TokenTransportError(f"choices[0].message lacks {missing}")
    bundle = {k: message[k] for k in TOKEN_FIELDS}
    if len(bundle["generation_token_ids"]) != len(bundle["generation_log_probs"]):
        raise TokenTransportError("generation_token_ids and generation_log_probs differ in length")
    top_prompt, choice_ids = response.get("prompt_token_ids"), choice.get("token_ids")
    if (top_prompt is None) != (choice_ids is None):
        raise TokenTransportError("only one of top-level prompt_token_ids and choices[0].token_ids is present")
    if top_prompt is not None and (top_prompt != bundle["prompt_token_ids"]
                                   or choice_ids != bundle["generation_token_ids"]):
        raise TokenTransportError("message-level token IDs disagree with prompt_token_ids/token_ids")
    from_logprobs = _logprob_tokens(choice)
    if from_logprobs is not None and from_logprobs[0] != bundle["generation_token_ids"]:
        raise TokenTransportError("generation_token_ids disagree with the token_id:N entries of logprobs.content")

    content = message.get("content") or ""
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if reasoning and vllm_cfg.get("uses_reasoning_parser"):
        content = f"<think>{reasoning}</think>{content}"
    tool_calls = [
        {"call_id": c["id"], "name": c["function"]["name"], "arguments": _arguments(c["function"]["arguments"])}
        for c in message.get("tool_calls") or []
    ]
    return {"content": content, "tool_calls": tool_calls, "finish_reason": choice.get("finish_reason"), **bundle}


def _arguments(arguments):
    return arguments if isinstance(arguments, str) else json.dumps(arguments)


def output_items(turn):
    """The Gym Responses output items of one model turn; the last carries the token fields (as Gym does)."""
    items = []
    if turn["content"] or not turn["tool_calls"]:
        items.append({"type": "message", "role": "assistant", "status": "completed",
                      "content": [{"type": "output_text", "text": turn["content"], "annotations": []}]})
    for call in turn["tool_calls"]:
        items.append({"type": "function_call", "status": "completed", "id": call["call_id"], **call})
    items[-1].update({k: turn[k] for k in TOKEN_FIELDS})
    return items
