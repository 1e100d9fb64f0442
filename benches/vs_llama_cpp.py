#!/usr/bin/env python3
"""gym-serve's CPU engine against llama.cpp on the same checkpoint, side by side.

Runs llama.cpp's `llama-batched-bench` on GGUF conversions (F32, BF16, Q8_0)
of the `qwen3-0.6b-shape` checkpoint that `gym-serve make-model` writes, and
gym-serve's own engine bench (`cargo bench --bench engine`, which builds the
same seeded weights in memory, held as f32 and as bf16), alternating the two
round by round so that drift on a shared machine hits both. Prints decode
tok/s (all sequences' generated tokens / decode seconds, which is what
llama-batched-bench's S_TG is) and prefill tok/s (S_PP) at 1, 8, 32 and 64
sequences (256-token prompts, 128 generated), one long-context row (a
4,000-token prompt, then 64 generated), the median of the rounds, and ratios.

Python 3 standard library only; the GGUF conversion runs llama.cpp's own
`convert_hf_to_gguf.py` under a Python that has torch, numpy, safetensors and
transformers (default: the repo's `.ci/venv`, else this interpreter), with the
llama.cpp tree's own `gguf-py` first on the path. The fixture tokenizer's BPE
pre-tokenizer hash is not in llama.cpp's table; its regex is Qwen2's, so the
lookup is wrapped to answer "qwen2" for a hash it does not know (llama.cpp's
file itself is not edited).

llama.cpp (CPU-only, Release) from the source inside the PyPI sdist of
llama-cpp-python, without a system cmake:

    pip download --no-deps --no-binary llama-cpp-python llama-cpp-python
    tar xzf llama_cpp_python-*.tar.gz     # llama.cpp is vendor/llama.cpp
    python3 -m venv venv && venv/bin/pip install cmake ninja
    cd llama_cpp_python-*/vendor/llama.cpp
    mv .git .git.sdist-link  # a dangling submodule link makes ninja regenerate forever
    cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF
    cmake --build build --target llama-batched-bench -j"$(nproc)"

Then:

    LLAMA_CPP_DIR=/path/to/vendor/llama.cpp python3 benches/vs_llama_cpp.py [--quick]

Options and environment:
  LLAMA_CPP_DIR / --llama-cpp-dir   llama.cpp source tree (build/bin/llama-batched-bench,
                                    convert_hf_to_gguf.py, gguf-py/)
  LLAMA_BATCHED_BENCH               the llama-batched-bench binary, if not in build/bin
  GYM_SERVE_BIN / --gym-serve       gym-serve binary for make-model (default
                                    target/release/gym-serve, then target/debug, else cargo build)
  GYM_SERVE_ENGINE_BENCH            engine bench binary (default: cargo bench --bench engine
                                    --no-run, the newest target/release/deps/engine-*)
  LLAMA_CPP_PYTHON / --convert-python   Python for the conversion
  --work-dir                        checkpoint, GGUF files (cached) and raw outputs
                                    (default target/vs-llama-cpp)
  --gym-weights f32,bf16,bf16-products (the engine bench's GYM_SERVE_BENCH_WEIGHTS;
                                    bf16-products is --compute-dtype bf16, skipped on CPUs
                                    without AVX512-BF16 or AMX-BF16)
  --rounds N (2), --threads N (nproc), --long N (4000; 0 for none),
  --llama-types f32,bf16,q8_0, --llama-args "..." (extra llama-batched-bench flags,
  e.g. "-ctk f32 -ctv f32" or "-fa off"), --quick (1 round, 8 and 32 sequences,
  32 generated, no long row).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GGUF_TYPES = {"f32": "F32", "bf16": "BF16", "q8_0": "Q8_0"}
PROMPT = 256


# --------------------------------------------------------------------------
# Conversion (runs under the conversion Python, as `_convert`)
# --------------------------------------------------------------------------


def convert_main(argv: list[str]) -> None:
    """`_convert LLAMA_CPP_DIR MODEL_DIR OUTTYPE OUTFILE`: convert_hf_to_gguf.py
    with the BPE pre-tokenizer lookup answering "qwen2" for an unknown hash."""
    llama_dir, model_dir, outtype, outfile = argv
    llama_dir = str(Path(llama_dir).resolve())
    sys.path[0:0] = [os.path.join(llama_dir, "gguf-py"), llama_dir]
    import importlib

    conv = importlib.import_module("convert_hf_to_gguf")
    modules = [conv]
    try:  # newer trees split the model classes into the `conversion` package
        modules.append(importlib.import_module("conversion.base"))
    except ImportError:
        pass
    patched = []
    for mod in modules:
        for name, cls in list(vars(mod).items()):
            if isinstance(cls, type) and "get_vocab_base_pre" in vars(cls):
                original = vars(cls)["get_vocab_base_pre"]

                def lookup(self, tokenizer, _original=original):
                    try:
                        return _original(self, tokenizer)
                    except NotImplementedError:
                        print(
                            "vs_llama_cpp: BPE pre-tokenizer hash not in llama.cpp's table; "
                            "the gym-serve fixture uses Qwen2's regex: tokenizer.ggml.pre = qwen2",
                            file=sys.stderr,
                        )
                        return "qwen2"

                cls.get_vocab_base_pre = lookup
                patched.append(f"{mod.__name__}.{name}")
    # Qwen's set_vocab tries sentencepiece first and falls back to BPE on
    # FileNotFoundError (our fixture has no tokenizer.model), but imports
    # sentencepiece before looking: look first, so it needn't be installed.
    for cls in {c for m in modules for c in vars(m).values() if isinstance(c, type)}:
        sp = vars(cls).get("_create_vocab_sentencepiece")
        if sp is None:
            continue

        def create(self, _sp=sp):
            if not (Path(self.dir_model) / "tokenizer.model").is_file():
                raise FileNotFoundError(f"File not found: {self.dir_model}/tokenizer.model")
            return _sp(self)

        cls._create_vocab_sentencepiece = create
    if not patched:
        sys.exit("vs_llama_cpp: no get_vocab_base_pre found to wrap in this llama.cpp version")
    print(f"vs_llama_cpp: wrapped get_vocab_base_pre in {', '.join(patched)}", file=sys.stderr)
    sys.argv = ["convert_hf_to_gguf.py", model_dir, "--outtype", outtype, "--outfile", outfile]
    conv.main()


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def load() -> str:
    try:
        return "load %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "load n/a"


def run_logged(cmd: list[str], raw: Path, env: dict | None = None, cwd: Path | None = None) -> str:
    """Run `cmd` with stdout+stderr going to `raw` as it runs; return that output."""
    log(f"{load()}: {' '.join(shlex.quote(c) for c in cmd)}")
    t = time.time()
    with open(raw, "w") as f:
        f.write(f"# {datetime.datetime.now().isoformat()} {load()}\n# {shlex.join(cmd)}\n")
        f.flush()
        start = f.tell()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    with open(raw) as f:
        f.seek(start)
        out = f.read()
    with open(raw, "a") as f:
        f.write(f"\n# exit {proc.returncode} after {time.time() - t:.1f}s, {load()}\n")
    if proc.returncode != 0:
        sys.stderr.write(out[-4000:])
        sys.exit(f"vs_llama_cpp: command failed ({proc.returncode}); output in {raw}")
    return out


def find_gym_serve(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    for profile in ("release", "debug"):
        if (target / profile / "gym-serve").exists():
            return target / profile / "gym-serve"
    subprocess.run(["cargo", "build", "--release", "--bin", "gym-serve"], cwd=REPO, check=True)
    return target / "release" / "gym-serve"


def find_engine_bench(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    proc = subprocess.run(
        ["cargo", "bench", "--bench", "engine", "--no-run"],
        cwd=REPO, stderr=subprocess.PIPE, text=True,
    )
    sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        sys.exit("vs_llama_cpp: cargo bench --bench engine --no-run failed")
    m = re.search(r"Executable .*\((\S*engine-[0-9a-f]+)\)", proc.stderr)
    if m:
        p = Path(m.group(1))
        return p if p.is_absolute() else REPO / p
    deps = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target")) / "release" / "deps"
    found = [
        p for p in deps.glob("engine-*")
        if p.is_file() and os.access(p, os.X_OK) and "." not in p.name
    ]
    if not found:
        sys.exit(f"vs_llama_cpp: no engine bench binary in {deps}")
    return max(found, key=lambda p: p.stat().st_mtime)


def default_convert_python() -> str:
    venv = REPO / ".ci" / "venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


# --------------------------------------------------------------------------
# Output parsing
# --------------------------------------------------------------------------


def parse_llama(out: str) -> dict[tuple[int, int], tuple[float, float]]:
    """{(prompt, sequences): (decode tok/s, prefill tok/s)} from --output-format jsonl
    (or the markdown table of older versions)."""
    rows = {}
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("{") and "speed_tg" in line:
            r = json.loads(line)
            rows[(int(r["pp"]), int(r["pl"]))] = (float(r["speed_tg"]), float(r["speed_pp"]))
        elif re.match(r"^\|\s*\d+\s*\|", line):
            c = [x.strip() for x in line.strip("|").split("|")]
            # PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s
            rows[(int(c[0]), int(c[2]))] = (float(c[7]), float(c[5]))
    return rows


def parse_engine(out: str) -> dict[tuple[str, int, int], tuple[float, float]]:
    """{(weights, prompt, sequences): (decode, prefill)} from the engine bench's
    markdown table, found by its header names; a table without a `weights`
    column (older binaries, f32 weights only) is read as F32. Rows with another
    KV cache dtype are left out."""
    rows = {}
    cols = None
    for line in out.splitlines():
        line = line.strip()
        if not line.startswith("|"):
            cols = None
            continue
        cells = [x.strip() for x in line.strip("|").split("|")]
        if "decode tok/s" in cells and "sequences" in cells:
            cols = {name: i for i, name in enumerate(cells)}
            continue
        if cols is None or set(line) <= set("|-: "):
            continue
        label = cells[cols["sequences"]]
        m = re.fullmatch(r"(\d+)(?:,\s*(\d+)-token prompt)?", label)
        if not m:
            continue  # e.g. "32, BF16 KV cache"
        weights = cells[cols["weights"]].upper() if "weights" in cols else "F32"
        prompt = int(m.group(2)) if m.group(2) else PROMPT
        rows[(weights, prompt, int(m.group(1)))] = (
            float(cells[cols["decode tok/s"]]),
            float(cells[cols["prefill tok/s"]]),
        )
    return rows


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_convert":
        convert_main(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-cpp-dir", default=os.environ.get("LLAMA_CPP_DIR"))
    ap.add_argument("--gym-serve", default=os.environ.get("GYM_SERVE_BIN"))
    ap.add_argument("--engine-bench", default=os.environ.get("GYM_SERVE_ENGINE_BENCH"))
    ap.add_argument("--convert-python", default=os.environ.get("LLAMA_CPP_PYTHON"))
    ap.add_argument("--work-dir", default=os.environ.get("VS_LLAMA_CPP_WORK", REPO / "target" / "vs-llama-cpp"))
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seqs", default=None, help="sequence counts (default 1,8,32,64; quick 8,32)")
    ap.add_argument("--long", type=int, default=None, help="long prompt length (4000; quick 0)")
    ap.add_argument("--llama-types", default="f32,bf16,q8_0")
    ap.add_argument("--llama-args", default="", help="extra llama-batched-bench flags")
    ap.add_argument("--gym-weights", default="f32,bf16,bf16-products",
                    help="engine bench weights (bf16-products: --compute-dtype bf16, where the CPU has it)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()

    if not args.llama_cpp_dir:
        sys.exit("vs_llama_cpp: set LLAMA_CPP_DIR (or --llama-cpp-dir) to a llama.cpp tree with a build")
    llama_dir = Path(args.llama_cpp_dir).resolve()
    batched = Path(os.environ.get("LLAMA_BATCHED_BENCH", llama_dir / "build" / "bin" / "llama-batched-bench"))
    if not batched.exists():
        sys.exit(f"vs_llama_cpp: {batched} missing: cmake --build build --target llama-batched-bench")
    rounds = args.rounds or (1 if args.quick else 2)
    gen = 32 if args.quick else 128
    seqs = [int(x) for x in (args.seqs or ("8,32" if args.quick else "1,8,32,64")).split(",")]
    long_prompt = args.long if args.long is not None else (0 if args.quick else 4000)
    long_gen = 64
    types = [t.strip().lower() for t in args.llama_types.split(",") if t.strip()]
    for t in types:
        if t not in GGUF_TYPES:
            sys.exit(f"vs_llama_cpp: unknown llama type {t} (f32, bf16, q8_0)")

    work = Path(args.work_dir).resolve()
    raw_dir = work / "raw" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    raw_dir.mkdir(parents=True, exist_ok=True)
    gym_serve = find_gym_serve(args.gym_serve)
    engine = find_engine_bench(args.engine_bench)
    convert_python = args.convert_python or default_convert_python()

    # The checkpoint (the engine bench builds the same seeded weights itself).
    ckpt = work / "qwen3-0.6b-shape-bf16"
    if not (ckpt / ".complete").exists():
        shutil.rmtree(ckpt, ignore_errors=True)
        run_logged(
            [str(gym_serve), "make-model", "--preset", "qwen3-0.6b-shape", "--dtype", "bf16",
             "--seed", "0", "--out", str(ckpt)],
            raw_dir / "make-model.log",
        )
        (ckpt / ".complete").write_text("make-model --preset qwen3-0.6b-shape --dtype bf16 --seed 0\n")
    ggufs = {}
    for t in types:
        out = work / f"qwen3-0.6b-shape-{t}.gguf"
        if not out.exists():
            tmp = out.with_suffix(".gguf.partial")
            env = dict(os.environ)
            env.pop("NO_LOCAL_GGUF", None)
            run_logged(
                [convert_python, str(Path(__file__).resolve()), "_convert", str(llama_dir),
                 str(ckpt), t, str(tmp)],
                raw_dir / f"convert-{t}.log", env=env,
            )
            tmp.rename(out)
        ggufs[t] = out

    extra = shlex.split(args.llama_args)

    def llama(t: str, prompt: int, tg: int, npl: list[int], tag: str):
        # One KV stream per sequence; llama.cpp pads each to a multiple of 256.
        ctx = max(npl) * -(-(prompt + tg) // 256) * 256
        cmd = [str(batched), "-m", str(ggufs[t]), "-c", str(ctx), "-b", "2048", "-ub", "512",
               "-npp", str(prompt), "-ntg", str(tg), "-npl", ",".join(map(str, npl)),
               "-t", str(args.threads), "--output-format", "jsonl", *extra]
        got = parse_llama(run_logged(cmd, raw_dir / f"{tag}-llama-{t}.log"))
        missing = [n for n in npl if (prompt, n) not in got]
        if missing:
            sys.exit(f"vs_llama_cpp: llama-batched-bench gave no row for {missing} sequences (see {tag}-llama-{t}.log)")
        return got

    def llama_round(r: int) -> None:
        for t in types:
            label = f"llama.cpp {GGUF_TYPES[t]}"
            for (p, n), v in llama(t, PROMPT, gen, seqs, f"r{r}").items():
                results.setdefault((label, p, n), []).append(v)
            if long_prompt:
                for (p, n), v in llama(t, long_prompt, long_gen, [1], f"r{r}-long").items():
                    results.setdefault((label, p, n), []).append(v)

    def gym_serve_round(r: int) -> None:
        env = dict(os.environ)
        env["GYM_SERVE_BENCH_SEQS"] = ",".join(map(str, seqs))
        env["GYM_SERVE_BENCH_LONG"] = str(long_prompt)
        env["GYM_SERVE_BENCH_WEIGHTS"] = args.gym_weights
        env["GYM_SERVE_BENCH_MATMUL_ROWS"] = "1"  # the matmul table is not compared here
        env.pop("GYM_SERVE_BENCH_QUICK", None)
        if args.quick:
            env["GYM_SERVE_BENCH_QUICK"] = "1"
        out = run_logged([str(engine), "--bench"], raw_dir / f"r{r}-gym-serve.log", env=env)
        got = parse_engine(out)
        if not got:
            sys.exit(f"vs_llama_cpp: no throughput table in the engine bench output (r{r}-gym-serve.log)")
        for (w, p, n), v in got.items():
            results.setdefault((f"gym-serve {w.lower()}", p, n), []).append(v)

    # results[(engine label, prompt, seqs)] = [(decode, prefill) per round]
    results: dict[tuple[str, int, int], list[tuple[float, float]]] = {}
    loads = []
    for r in range(1, rounds + 1):
        log(f"round {r}/{rounds}")
        loads.append(load())
        # llama.cpp then gym-serve, then the other way round (ABBA), so that a
        # steady drift in the machine's load hits both alike.
        order = [llama_round, gym_serve_round] if r % 2 else [gym_serve_round, llama_round]
        for step in order:
            step(r)
    loads.append(load())

    med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v))
           for k, v in results.items()}
    (raw_dir / "results.json").write_text(json.dumps(
        {"rounds": rounds, "loads": loads, "llama_args": extra, "threads": args.threads,
         "runs": {f"{k[0]} | {k[1]} | {k[2]}": v for k, v in results.items()}}, indent=1))

    ours = [e for e in ("gym-serve f32", "gym-serve bf16", "gym-serve bf16-products")
            if any(k[0] == e for k in results)]
    engines = ours + [f"llama.cpp {GGUF_TYPES[t]}" for t in types]
    ratios = [("gym-serve f32", "llama.cpp F32"), ("gym-serve bf16", "llama.cpp BF16"),
              ("gym-serve f32", "llama.cpp BF16"), ("gym-serve bf16-products", "llama.cpp BF16")]
    ratios = [(a, b) for a, b in ratios if a in engines and b in engines]
    row_keys = [(PROMPT, n) for n in seqs] + ([(long_prompt, 1)] if long_prompt else [])

    def cell(e, p, n, i):
        v = med.get((e, p, n))
        return f"{v[i]:.1f}" if v else "-"

    def ratio(a, b, p, n, i):
        x, y = med.get((a, p, n)), med.get((b, p, n))
        return f"{x[i] / y[i]:.2f}x" if x and y and y[i] else "-"

    print(f"\ngym-serve vs llama.cpp (CPU, {args.threads} threads; median of {rounds} round(s); "
          f"prompts {PROMPT} tokens, {gen} generated per sequence"
          + (f"; long row: {long_prompt}-token prompt, {long_gen} generated" if long_prompt else "")
          + f"; llama-batched-bench -b 2048 -ub 512 {' '.join(extra)}".rstrip() + ")")
    print(f"machine load by round: {'; '.join(loads)}")
    for i, what in ((0, "decode tok/s"), (1, "prefill tok/s")):
        head = ["sequences"] + engines + [f"gs-{a.split()[1]} / llama-{b.split()[1]}" for a, b in ratios]
        print(f"\n{what}")
        print("| " + " | ".join(head) + " |")
        print("| --- |" + " ---: |" * (len(head) - 1))
        for p, n in row_keys:
            label = str(n) if p == PROMPT else f"{n}, {p}-token prompt"
            cells = [cell(e, p, n, i) for e in engines] + [ratio(a, b, p, n, i) for a, b in ratios]
            print("| " + " | ".join([label] + cells) + " |")
    print(f"\nraw outputs: {raw_dir}")


if __name__ == "__main__":
    main()
