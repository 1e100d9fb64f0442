"""config.yaml as typed sections: what the loop reads, with defaults and checks in one place."""
from dataclasses import dataclass, field, fields
from typing import Optional

import yaml


@dataclass
class ServerConfig:
    urls: list = field(default_factory=list)
    binary: str = "target/debug/gym-serve"
    model: str = "models/out/gym_rl_tiny"
    make_model: Optional[list] = None
    replicas: int = 1
    served_model_name: str = "policy"
    args: list = field(default_factory=list)
    api_key: Optional[str] = None
    admin_api_key: Optional[str] = None


@dataclass
class RolloutConfig:
    source: str = "direct"
    dataset: str = "examples/gym_rl/data/tasks.jsonl"
    prompts_per_step: int = 2
    group_size: int = 4
    max_turns: int = 3
    max_tokens: int = 24
    temperature: float = 1.0
    concurrency: int = 8
    seed: int = 1
    gym_agent: str = "example_multi_turn_gymnasium_agent"


@dataclass
class TrainConfig:
    steps: int = 3
    optimizer: str = "adamw"
    lr: float = 1e-3
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    tis_cap: Optional[float] = None
    normalize_std: bool = True
    max_grad_norm: float = 1.0
    micro_batch_size: int = 8
    seed: int = 0
    require_current_version: bool = True


@dataclass
class PushConfig:
    dtype: str = "float32"
    pause: str = "wait"


@dataclass
class Config:
    server: ServerConfig
    rollout: RolloutConfig
    train: TrainConfig
    push: PushConfig
    log: Optional[str] = None
    nemo_gym: dict = field(default_factory=dict)

    @property
    def vllm_model(self) -> dict:
        """The vllm_model server's settings from the NeMo Gym section (the direct source follows them)."""
        return self.nemo_gym.get("policy_model", {}).get("responses_api_models", {}).get("vllm_model", {})


def _section(cls, values, name):
    values = values or {}
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"config section `{name}`: unknown keys {unknown}")
    return cls(**values)


def from_dict(raw: dict) -> Config:
    cfg = Config(
        server=_section(ServerConfig, raw.get("server"), "server"),
        rollout=_section(RolloutConfig, raw.get("rollout"), "rollout"),
        train=_section(TrainConfig, raw.get("train"), "train"),
        push=_section(PushConfig, raw.get("push"), "push"),
        log=raw.get("log"),
        nemo_gym=raw.get("nemo_gym") or {},
    )
    if cfg.rollout.source not in ("direct", "nemo_gym"):
        raise ValueError(f"rollout.source must be `direct` or `nemo_gym`, not {cfg.rollout.source!r}")
    if cfg.rollout.group_size < 2:
        raise ValueError("rollout.group_size must be >= 2: GRPO compares rollouts of the same prompt")
    if cfg.train.optimizer not in ("adamw", "sgd"):
        raise ValueError(f"train.optimizer must be `adamw` or `sgd`, not {cfg.train.optimizer!r}")
    if cfg.vllm_model and not cfg.vllm_model.get("return_token_id_information"):
        raise ValueError("nemo_gym vllm_model needs `return_token_id_information: true`: training needs the token IDs")
    return cfg


def load(path: str, overrides: Optional[dict] = None) -> Config:
    """Read `path`; `overrides` ({section: {key: value}}) replaces single keys (tests, CLI)."""
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    for section, values in (overrides or {}).items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return from_dict(raw)
