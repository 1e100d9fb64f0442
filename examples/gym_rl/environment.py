"""A tiny offline environment in NeMo Gym's task format, so the loop runs without Gym.

It combines the two offline examples that ship with NeMo Gym 0.7.0:
`example_single_tool_call` (a `get_weather` tool; reward when the model calls
it) and `example_multi_turn_gymnasium` (scripted `follow_ups` sent after each
model turn; reward when the last answer contains `expected_answer`). A task row:

    {"responses_create_params": {"input": [...], "tools": [...]},
     "follow_ups": ["..."], "expected_answer": "...", "expects_tool": "get_weather"}

A randomly initialised model never earns those rewards, and GRPO learns nothing
from a group whose rewards are all equal, so a rollout that fails the task
still earns up to 0.5 for how much of its last answer is plain text. That
keeps the CI loop's gradients non-zero; drop `plain_text_weight` for a real run.
"""
import json
import string

PLAIN = set(string.ascii_letters + string.digits + string.punctuation + " \n")


def load_tasks(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def get_weather(city):
    return {"city": city, "weather_description": f"The weather in {city} is cold."}


TOOLS = {"get_weather": get_weather}


def call_tool(name, arguments):
    """Run one tool call; a bad call is answered with an error text, as an agent would see it."""
    if name not in TOOLS:
        return json.dumps({"error": f"unknown tool {name!r}"})
    try:
        args = json.loads(arguments) if isinstance(arguments, str) else arguments
        return json.dumps(TOOLS[name](**args))
    except (ValueError, TypeError) as e:
        return json.dumps({"error": f"bad arguments for {name}: {e}"})


def follow_up(task, model_turns):
    """The user message after the model's `model_turns`-th answer, or None when the episode is over."""
    follow_ups = task.get("follow_ups", [])
    return follow_ups[model_turns - 1] if model_turns <= len(follow_ups) else None


def reward(task, final_text, called_tools, plain_text_weight=0.5):
    expected = task.get("expected_answer")
    if expected and expected.lower() in final_text.lower():
        return 1.0
    wanted = task.get("expects_tool")
    if wanted and wanted in called_tools:
        return 1.0
    if not final_text:
        return 0.0
    return plain_text_weight * sum(c in PLAIN for c in final_text) / len(final_text)
