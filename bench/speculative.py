"""Speculative decoding (prompt lookup, a draft model, lookahead) against plain decoding, side by side on one machine.

    python -m pdserve.bench.speculative [--methods prompt_lookup draft lookahead] [--k 4] [--tokens 128] [--rounds 3]

Local engines on SmolLM2 fp32: one plain, one per method (`engine.speculative: {method: ...}`; the draft is the
model itself with int4 layers, `--draft-quantization`; lookahead's window and n-gram size `--lookahead W N`), run in
turn (A B C A B C) for each workload, the median of
`rounds` reported:
- copy (batch 1): a piece of code, then the start of it again, as a completion (prompt lookup's home ground: this
  model goes on copying);
- copy chat (batch 1): a chat request to repeat the code exactly (this small model paraphrases);
- edit chat (batch 1): a chat request to rename a variable in it;
- chat (batch 1): an open question (little to copy);
- sampled chat (batch 1): the same at temperature 0.8 (prompt lookup stands down for sampled requests; a draft
  speculates, keeping the distribution);
- chat x16: 16 different chat requests at once (above `max_batch`, so speculation stands down).
Greedy workloads' outputs must be token-identical to plain decoding (checked). Printed per method: output tokens/s,
the speed-up, the share of proposals accepted and the tokens a speculative step emitted on average.
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
SAMPLED = "sampled chat (batch 1)"


def workloads() -> dict[str, list[Prompt]]:
    with open(CODE_FILE) as f:
        code = f.read().split('"""', 2)[2][:1200]  # the code after the module docstring
    ask = lambda text: Prompt(messages=(Message("user", text),))  # noqa: E731
    return {
        "copy (batch 1)": [Prompt(text=code + "\n# The same code again:\n" + code[:60])],
        "copy chat (batch 1)": [ask("Repeat this code exactly:\n" + code)],
        "edit chat (batch 1)": [ask("Rename `tokens` to `ids` in this code and show all of it:\n" + code)],
        "chat (batch 1)": [ask(QUESTIONS[2])],
        SAMPLED: [ask(QUESTIONS[2])],
        "chat x16": [ask(QUESTIONS[i % len(QUESTIONS)] + f" ({i})") for i in range(16)],
    }


def timed(engine: Engine, prompts: list[Prompt], sampling: SamplingParams) -> tuple[float, list[tuple[int, ...]]]:
    """(output tokens per second, each output's token ids)."""
    began = time.perf_counter()
    outputs = engine.generate(prompts, sampling)
    elapsed = time.perf_counter() - began
    return sum(len(o.token_ids) for o in outputs) / elapsed, [o.token_ids for o in outputs]


def speculation(engine: Engine) -> tuple[int, int, int]:
    return engine.speculative_steps_total, engine.speculative_proposed_total, engine.speculative_accepted_total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["prompt_lookup", "draft"],
                        choices=["prompt_lookup", "draft", "lookahead"])
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--draft-quantization", default="int4", choices=["int8", "int4"])
    parser.add_argument("--lookahead", nargs=2, type=int, default=[4, 3], metavar=("W", "N"))
    parser.add_argument("--fixed", action="store_true",
                        help="speculate whenever allowed (adaptive false): the methods' own effect, unmeasured")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    plain = Engine(EngineConfig(prefix_caching=False))
    engines = {m: Engine(EngineConfig(prefix_caching=False, speculative=SpeculativeSettings(
        method=m, k=args.k, max_batch=args.max_batch, draft_quantization=args.draft_quantization,
        lookahead_window=args.lookahead[0], lookahead_ngram=args.lookahead[1], adaptive=not args.fixed)))
        for m in args.methods}
    print(f"SmolLM2-135M-Instruct fp32, up to {args.tokens} tokens, k {args.k}, max_batch {args.max_batch}, draft "
          f"{args.draft_quantization}, lookahead W {args.lookahead[0]} N {args.lookahead[1]}, "
          f"{'fixed' if args.fixed else 'adaptive'}, median of {args.rounds} rounds (engines in turn)")
    print("| workload | plain tok/s | " + " | ".join(f"{m} tok/s | speed-up | accepted | tokens/step | identical"
                                                     for m in args.methods) + " |")
    print("|---|---:|" + "---:|---:|---:|---:|---:|" * len(args.methods))
    for name, prompts in workloads().items():
        sampling = SamplingParams(max_tokens=args.tokens, temperature=0.8 if name == SAMPLED else 0)
        every = {"plain": plain, **engines}
        for engine in every.values():
            timed(engine, prompts[:1], SamplingParams(max_tokens=4, temperature=0))  # warm up
        rates: dict[str, list[float]] = {m: [] for m in every}
        same = dict.fromkeys(engines, True)
        before = {m: speculation(e) for m, e in engines.items()}
        for _ in range(args.rounds):
            rate, expected = timed(plain, prompts, sampling)
            rates["plain"].append(rate)
            for m, engine in engines.items():
                rate, got = timed(engine, prompts, sampling)
                rates[m].append(rate)
                same[m] = same[m] and got == expected
        base = statistics.median(rates["plain"])
        cells = [f"{base:.1f}"]
        for m, engine in engines.items():
            steps, proposed, accepted = (a - b for a, b in zip(speculation(engine), before[m]))
            rate = statistics.median(rates[m])
            identical = "n/a (sampled)" if name == SAMPLED else ("yes" if same[m] else "NO")
            cells += [f"{rate:.1f}", f"{rate / base:.2f}x", f"{accepted / proposed:.0%}" if proposed else "-",
                      f"{1 + accepted / steps:.2f}" if steps else "-", identical]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
