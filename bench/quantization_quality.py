"""What int8, int4 and w8a8 cost in accuracy: greedy agreement with fp32 and perplexity on a fixed text.

    python -m pdserve.bench.quantization_quality [--tokens 64]

On the default model (SmolLM2-135M-Instruct): the test suite's oracle prompts and the 16 chat questions of
`bench.engine_vs_transformers`, greedy, `--tokens` tokens each (EOS ignored). Agreement is the share of tokens
equal to fp32's up to each output's first difference (after which the texts go their own ways); "identical" counts
whole outputs equal. Perplexity is over FIXED_TEXT, teacher-forced in one prefill.
"""

from __future__ import annotations

import argparse
import math
import os

import torch

from pdserve.bench.engine_vs_transformers import CHAT_QUESTIONS
from pdserve.engine import Engine, EngineConfig, Message, Prompt, SamplingParams
from pdserve.engine.config import QUANTIZATIONS

ORACLE_PROMPTS = [
    Prompt(messages=(Message("user", "What is the capital of France?"),)),
    Prompt(text="The quick brown fox"),
    Prompt(messages=(Message("system", "You answer in one word."), Message("user", "Name a colour of the sky."))),
    Prompt(text="def fibonacci(n):"),
    Prompt(messages=(Message("user", "Write a haiku about the sea."),)),
]

FIXED_TEXT = (
    "The river town grew up where the road from the hills met the water. Each spring, when the snow melted, boats "
    "came down with timber and wool, and the market square filled with traders who stayed for a week or two before "
    "the long journey home. The town kept records of every cargo in a ledger that still survives, and historians "
    "use it to trace how prices rose and fell over two centuries. In dry years the river ran low, the boats could "
    "not pass the shallows below the bridge, and the town sent wagons instead, at twice the cost. A canal was "
    "proposed many times, but the council never agreed on who should pay for it. When the railway finally arrived, "
    "the boats disappeared within a decade, and the old warehouses by the quay were turned into workshops, then "
    "into homes. Today visitors walk along the quay and read the painted signs that still name the merchants who "
    "once worked there, and the ledger sits behind glass in the small museum next to the church.")


def perplexity(engine: Engine, token_ids: list[int]) -> float:
    """exp(mean negative log-likelihood) of each token given the ones before, in one prefill."""
    engine.add_request("perplexity", token_ids, SamplingParams(max_tokens=1))
    [chunk] = engine.scheduler.schedule().chunks
    step = engine.runner.prepare((chunk,))
    with torch.inference_mode():
        hidden = engine.model(step.input_ids, step.positions, engine.kv_cache, step.meta)  # [T, hidden]
        logits = engine.model.logits(hidden[:-1])  # [T - 1, V]
    engine.abort("perplexity")
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(token_ids[1:]))
    return math.exp(nll.item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompts = ORACLE_PROMPTS + [Prompt(messages=(Message("user", q),)) for q in CHAT_QUESTIONS]
    greedy = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    outputs, ppl = {}, {}
    for method in QUANTIZATIONS:
        engine = Engine(EngineConfig(quantization=method, num_kv_blocks=512, max_num_batched_tokens=1024))
        outputs[method] = [o.token_ids for o in engine.generate(prompts, greedy)]
        ppl[method] = perplexity(engine, engine.tokenize(Prompt(text=FIXED_TEXT)))
    print(f"{len(prompts)} prompts x {args.tokens} greedy tokens; perplexity over {FIXED_TEXT[:30]!r}...")
    print(f"{'weights':8s} {'agreement':>10s} {'identical':>10s} {'perplexity':>11s}")
    for method in QUANTIZATIONS:
        prefix = sum(next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), len(ref))
                     for ours, ref in zip(outputs[method], outputs["none"]))
        identical = sum(ours == ref for ours, ref in zip(outputs[method], outputs["none"]))
        share = prefix / (len(prompts) * args.tokens)
        print(f"{method:8s} {share:10.1%} {identical:>6d}/{len(prompts):<3d} {ppl[method]:11.3f}")


if __name__ == "__main__":
    main()
