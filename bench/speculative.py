"""Speculative decoding by prompt lookup against plain decoding, side by side on one machine.

    python -m pdserve.bench.speculative [--k 4] [--tokens 128] [--rounds 3]

Two local engines on SmolLM2 (one with `engine.speculative: {method: prompt_lookup}`), run in turn A B A B for each
workload, the median of `rounds` reported:
- copy (batch 1): a piece of code, then the start of it again, as a completion (prompt lookup's home ground: this
  model goes on copying);
- copy chat (batch 1): a chat request to repeat the code exactly (this small model paraphrases);
- edit chat (batch 1): a chat request to rename a variable in it;
- chat (batch 1): an open question (little to copy);
- chat x16: 16 different chat requests at once (above `max_batch`, so speculation stands down).
Each greedy, up to `tokens` tokens; outputs must be token-identical (checked). Printed: output tokens/s of each, the
ratio, and the share of proposals accepted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from pdserve.engine import Engine, EngineConfig, Message, Prompt, SamplingParams
from pdserve.engine.config import SpeculativeSettings

CODE_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "engine", "prompt_lookup.py")
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis briefly.",
             "Give three tips for sleeping well.", "What is a prime number?", "Name four planets.",
             "How do bees make honey?", "Describe a cat in one sentence."]


def workloads() -> dict[str, list[Prompt]]:
    with open(CODE_FILE) as f:
        code = f.read().split('"""', 2)[2][:1200]  # the code after the module docstring
    ask = lambda text: Prompt(messages=(Message("user", text),))  # noqa: E731
    return {
        "copy (batch 1)": [Prompt(text=code + "\n# The same code again:\n" + code[:60])],
        "copy chat (batch 1)": [ask("Repeat this code exactly:\n" + code)],
        "edit chat (batch 1)": [ask("Rename `tokens` to `ids` in this code and show all of it:\n" + code)],
        "chat (batch 1)": [ask(QUESTIONS[2])],
        "chat x16": [ask(QUESTIONS[i % len(QUESTIONS)] + f" ({i})") for i in range(16)],
    }


def timed(engine: Engine, prompts: list[Prompt], tokens: int) -> tuple[float, list[tuple[int, ...]]]:
    """(output tokens per second, each output's token ids)."""
    began = time.perf_counter()
    outputs = engine.generate(prompts, SamplingParams(max_tokens=tokens, temperature=0))
    elapsed = time.perf_counter() - began
    return sum(len(o.token_ids) for o in outputs) / elapsed, [o.token_ids for o in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    plain = Engine(EngineConfig(prefix_caching=False))
    speculating = Engine(EngineConfig(prefix_caching=False, speculative=SpeculativeSettings(
        method="prompt_lookup", k=args.k, max_batch=args.max_batch)))
    print(f"SmolLM2-135M-Instruct fp32, greedy, up to {args.tokens} tokens, k {args.k}, max_batch {args.max_batch}, "
          f"median of {args.rounds} rounds (A B A B)")
    print("| workload | plain tok/s | prompt lookup tok/s | speed-up | proposals accepted | identical |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, prompts in workloads().items():
        timed(plain, prompts[:1], 4)  # warm up both
        timed(speculating, prompts[:1], 4)
        rates: dict[str, list[float]] = {"plain": [], "spec": []}
        same = True
        before = speculating.speculative_accepted_total, speculating.speculative_proposed_total
        for _ in range(args.rounds):
            rate, expected = timed(plain, prompts, args.tokens)
            rates["plain"].append(rate)
            rate, got = timed(speculating, prompts, args.tokens)
            rates["spec"].append(rate)
            same = same and got == expected
        accepted = speculating.speculative_accepted_total - before[0]
        proposed = speculating.speculative_proposed_total - before[1]
        a, b = statistics.median(rates["plain"]), statistics.median(rates["spec"])
        share = f"{accepted / proposed:.0%} of {proposed}" if proposed else "none proposed"
        print(f"| {name} | {a:.1f} | {b:.1f} | {b / a:.2f}x | {share} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
