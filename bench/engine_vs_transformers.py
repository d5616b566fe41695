"""Benchmark: our engine vs transformers `generate`, side by side in one run, same model file, same threads.

    python -m pdserve.bench.engine_vs_transformers [--model smollm2-135m-instruct] [--tokens 64] [--repeats 3]
        [--quantization none int8 int4 w8a8] [--compile]

Measures, with ours and transformers alternating and the median of each reported (a noisy neighbour hits both):
- decode tokens/s at 1 and 16 concurrent requests: equal-length prompts, every request forced to `tokens` tokens
  (EOS ignored), so both do the same work; = requests x (tokens - 1) / (time for `tokens` - time for 1 token);
- prefill tokens/s for a 1024-token prompt (time to the first token);
- chat throughput: 16 different chat requests at once, greedy, each ending at its own EOS (or 128 tokens); useful
  output tokens/s. transformers pads the batch and runs until the longest finishes (static batching); we batch
  continuously.
Each measure runs transformers (fp32) once and our engine once per `--quantization` method, all against the same
transformers figure. `--compile` turns on `engine.compile` for ours (its graphs compile as each engine starts). Prints a
table with the ratios and writes JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from pdserve.engine import Engine, EngineConfig, Message, Prompt, SamplingParams
from pdserve.engine.config import QUANTIZATIONS
from pdserve.engine.model_source import DEFAULT_MODEL, default_gguf_path


@dataclass(frozen=True)
class Row:
    name: str
    ours: float
    baseline: float
    """transformers here; llama.cpp in bench.engine_vs_llamacpp."""

    @property
    def ratio(self) -> float:
        return self.ours / self.baseline


def median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_prompts(engine: Engine, count: int, length: int) -> list[list[int]]:
    """`count` different prompts of exactly `length` tokens (real text, so attention is realistic)."""
    base = ("The history of the city begins with a small fishing village on the river, where traders from the "
            "north came each summer to exchange furs, salt and iron tools for grain and dried fish. ")
    ids = engine.tokenize(Prompt(text=base * (1 + (count * 16 + length) // 20)))
    return [ids[i * 16:i * 16 + length] for i in range(count)]


class Ours:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def generate(self, prompts: list[list[int]], tokens: int) -> None:
        params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
        outputs = self.engine.generate(prompts, params)
        assert all(len(o.token_ids) == tokens for o in outputs)


CHAT_QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis in two sentences.",
    "Give me three tips for better sleep.", "What is 17 times 23?", "Name a famous painting by Van Gogh.",
    "Write a short poem about autumn leaves.", "How do I reverse a list in Python?", "What causes rain?",
    "Tell me a fun fact about octopuses.", "Summarise the plot of Romeo and Juliet.", "What is a black hole?",
    "Suggest a name for a small bakery.", "Why is the sky blue?", "List four primary school subjects.",
    "Describe a cat in one sentence.",
]


def chat_prompts(engine: Engine) -> list[list[int]]:
    return [engine.tokenize(Prompt(messages=(Message("user", q),))) for q in CHAT_QUESTIONS]


class Transformers:
    def __init__(self, gguf_path: str) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=torch.float32).eval()

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], tokens: int) -> None:
        ids = torch.tensor(prompts)  # equal lengths: no padding needed
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                  min_new_tokens=tokens, do_sample=False, pad_token_id=0)
        assert out.shape[1] == ids.shape[1] + tokens

    @torch.inference_mode()
    def chat(self, prompts: list[list[int]], max_tokens: int, eos: int) -> int:
        """Left-padded static batch; returns the useful tokens (up to and including each row's first EOS)."""
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[eos] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out = self.model.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
                                  eos_token_id=eos, pad_token_id=eos)[:, width:].tolist()
        return sum(row.index(eos) + 1 if eos in row else len(row) for row in out)


def our_chat(engine: Engine, prompts: list[list[int]], max_tokens: int) -> int:
    outputs = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0))
    return sum(len(o.token_ids) for o in outputs)


def chat_rate(run_chat: Callable[[], int], repeats: int) -> float:
    tokens = run_chat()
    return tokens / median_time(run_chat, repeats)


def decode_rate(system, prompts: list[list[int]], tokens: int, repeats: int) -> float:
    full = median_time(lambda: system.generate(prompts, tokens), repeats)
    first = median_time(lambda: system.generate(prompts, 1), repeats)
    return len(prompts) * (tokens - 1) / (full - first)


def prefill_rate(system, prompt: list[int], repeats: int) -> float:
    return len(prompt) / median_time(lambda: system.generate([prompt], 1), repeats)


def run(args: argparse.Namespace) -> list[Row]:
    torch.set_num_threads(args.threads)
    engines = {q: Engine(EngineConfig(model=args.model, max_num_batched_tokens=args.chunk, num_kv_blocks=1024,
                                      quantization=q, prefix_caching=False, compile=args.compile))
               for q in args.quantization}
    engine = next(iter(engines.values()))
    ours, theirs = {q: Ours(e) for q, e in engines.items()}, Transformers(default_gguf_path())
    prompts = make_prompts(engine, 16, 32)
    long_prompt = make_prompts(engine, 1, 1024)[0]
    for system in (*ours.values(), theirs):  # warm up all
        system.generate(prompts[:1], 4)
        system.generate(prompts[:2], 4)
    rows: list[Row] = []

    def measure(name: str, rate: Callable[[object], float]) -> None:
        baseline = rate(theirs)
        for q, system in ours.items():
            rows.append(Row(f"{name} [{q}]", rate(system), baseline))
            print(f"  {rows[-1].name}: ours {rows[-1].ours:.1f}, transformers {baseline:.1f}", flush=True)

    for batch in (1, 16):
        measure(f"decode tok/s, {batch} concurrent", lambda s, b=batch: decode_rate(s, prompts[:b], args.tokens,
                                                                                   args.repeats))
    measure("prefill tok/s, 1024-token prompt", lambda s: prefill_rate(s, long_prompt, args.repeats))
    chats, eos = chat_prompts(engine), engine.eos_token_ids[0]
    measure("chat tok/s, 16 concurrent, own EOS",
            lambda s: chat_rate(lambda: theirs.chat(chats, 128, eos) if s is theirs else our_chat(s.engine, chats, 128),
                                args.repeats))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per request in decode runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--chunk", type=int, default=512, help="our max_num_batched_tokens")
    parser.add_argument("--quantization", nargs="+", default=["none"], choices=QUANTIZATIONS,
                        help="our engine's weight quantisation(s); transformers stays fp32")
    parser.add_argument("--compile", action="store_true", help="our engines with engine.compile on")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    rows = run(args)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"{args.threads} torch threads, torch {torch.__version__}, fp32, {args.model}, compile {args.compile}")
    print(f"{'measure':44s} {'ours':>10s} {'transformers':>13s} {'ratio':>7s}")
    for row in rows:
        print(f"{row.name:44s} {row.ours:10.1f} {row.baseline:13.1f} {row.ratio:6.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump([asdict(r) | {"ratio": r.ratio} for r in rows], f, indent=1)


if __name__ == "__main__":
    main()
