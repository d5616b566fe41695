"""lm-eval (the EleutherAI harness) scores a loglikelihood task against a live cluster, and against transformers'
own model class on the same model, side by side: the scores must agree (issue 23). No hub downloads: the task's
items are written into a local file.

    pip install "lm-eval[api]"     # not a pdserve dependency: this check alone uses it
    python -m pdserve.bench.lm_eval_check [--items 40]

The task is multiple choice: each item a context and three continuations, scored by their log-likelihoods (lm-eval's
`local-completions` model sends them as token ids with `echo: true, logprobs: 1, max_tokens: 1`, and sums the prompt
tokens' logprobs of each continuation). A 1 prefill + 1 decode cluster serves SmolLM2; transformers loads the same
GGUF file in fp32. Printed: accuracy and normalised accuracy from each, the largest difference between the two in
any continuation's log-likelihood, and the time each took.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

from pdserve.bench.local_cluster import start_cluster, stop_cluster
from pdserve.engine.config import EngineConfig
from pdserve.engine.model_source import default_gguf_path

CONFIG = {"workers": {"prefill": {"count": 1, "resources": {"cpus": 1}},
                      "decode": {"count": 1, "resources": {"cpus": 1}}}}
FACTS = [("The capital of France is", "Paris", ["London", "Rome"]),
         ("The capital of Japan is", "Tokyo", ["Seoul", "Beijing"]),
         ("Water freezes at zero degrees", "Celsius", ["Kelvin", "Newtons"]),
         ("The largest planet in the solar system is", "Jupiter", ["Mercury", "Mars"]),
         ("A week has seven", "days", ["hours", "years"]),
         ("The opposite of hot is", "cold", ["loud", "tall"]),
         ("Bees make", "honey", ["steel", "glass"]),
         ("The sun rises in the", "east", ["west", "cellar"]),
         ("Two plus two equals", "four", ["seven", "nine"]),
         ("Cats like to chase", "mice", ["cars", "clouds"])]
TASK = """task: pdserve_facts
dataset_path: json
dataset_kwargs:
  data_files:
    test: {items}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def write_task(folder: str, count: int) -> None:
    rng = random.Random(0)
    with open(os.path.join(folder, "items.jsonl"), "w") as f:
        for i in range(count):
            context, right, wrong = FACTS[i % len(FACTS)]
            choices = [right, *wrong]
            rng.shuffle(choices)
            f.write(json.dumps({"context": context, "choices": choices, "answer": choices.index(right)}) + "\n")
    with open(os.path.join(folder, "pdserve_facts.yaml"), "w") as f:
        f.write(TASK.format(items=os.path.join(folder, "items.jsonl")))


def evaluate(model: str, model_args: dict, folder: str) -> tuple[dict, list[float], float]:
    """(metrics, every continuation's log-likelihood in order, seconds)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    began = time.monotonic()
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["pdserve_facts"],
                                  task_manager=TaskManager(include_path=folder), log_samples=True)
    seconds = time.monotonic() - began
    samples = out["samples"]["pdserve_facts"]
    loglikelihoods = [r[0][0] for s in sorted(samples, key=lambda s: s["doc_id"]) for r in s["resps"]]
    return out["results"]["pdserve_facts"], loglikelihoods, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=40)
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    gguf = default_gguf_path()
    with tempfile.TemporaryDirectory(prefix="pdserve-lm-eval-") as folder:
        write_task(folder, args.items)
        tokenizer_dir = os.path.join(folder, "tokenizer")
        AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf)).save_pretrained(
            tokenizer_dir)
        reference = evaluate("hf", {"pretrained": os.path.dirname(gguf), "gguf_file": os.path.basename(gguf),
                                    "tokenizer": tokenizer_dir, "dtype": "float32", "batch_size": 8,
                                    "device": "cpu"}, folder)
        os.makedirs(os.path.join(folder, "cluster"))
        cluster = start_cluster(os.path.join(folder, "cluster"), CONFIG)
        try:
            served = evaluate("local-completions",
                              {"base_url": cluster.http_url + "/completions", "model": EngineConfig().model,
                               "tokenizer": tokenizer_dir, "tokenizer_backend": "huggingface",
                               "num_concurrent": 4, "max_retries": 1}, folder)
        finally:
            stop_cluster(cluster)
    worst = max(abs(a - b) for a, b in zip(reference[1], served[1]))
    print(f"{args.items} items, {len(served[1])} continuations")
    print("| model | acc | acc_norm | seconds |")
    print("|---|---:|---:|---:|")
    for name, (metrics, _, seconds) in (("transformers (hf, fp32)", reference), ("pdserve cluster", served)):
        print(f"| {name} | {metrics['acc,none']:.3f} | {metrics['acc_norm,none']:.3f} | {seconds:.0f} |")
    print(f"largest log-likelihood difference: {worst:.2e}")


if __name__ == "__main__":
    main()
