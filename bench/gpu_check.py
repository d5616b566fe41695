"""One GPU check for any issue lent an H100/H200: correctness on CUDA, decode MBU and prefill MFU, in one table.

    bash scripts/gpu_check.sh [OUT_DIR]                       # what to run on a GPU machine (under 8 minutes)
    python -m pdserve.bench.gpu_check --device cpu --quick    # the same code on CPU, tiny, as CI checks it

No Ray, Redis, downloads or model files: random weights of real shapes. Writes `gpu_check.json` and
`gpu_check.md` (the table for BENCHMARKS.md) into the output folder.

- correctness: a small random Llama in transformers and in our engine (same weights, through a Hugging Face
  folder), greedy tokens compared, fp32 and bf16, paged kernels with CUDA graphs and the torch attention path;
- decode tok/s and MBU (bytes a step must read: weights + each request's KV, over the step time, against the
  device's peak bandwidth) at batch 1, 8 and 64 over 128-token contexts, and at batch 1 over 4k and batch 8 over 2k
  (where the KV, read by the paged kernel, is much of the bytes), for llama-3-8b bf16: CUDA graphs on and off, int8,
  int4, w8a8;
- prefill MFU (model FLOPs over the time to the first token, against the peak bf16 dense rate) at 512, 2k and 8k;
- speculative decoding's verify step: a forward pass over k + 1 new tokens per request (k = 1, 2, 4, 8 proposals)
  after a 128-token context held in the prefix cache, at batch 1 and 32, against k = 0 (random weights say nothing
  of acceptance; this cost is what decides when speculation pays);
- KV handoff (`bench.gpu_kv_check`): our connector's in-place handoff of 1 GiB of llama-3-8b KV and the IPC
  connector's handoff between two processes, each against a plain device copy, and decode steps with handoffs
  running beside them.
A row that fails records its error and the rest go on; both files are rewritten after every row, so a run its
timeout stops keeps every row it finished.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pdserve.bench.gpu_kv_check import DECODE_BATCH, beside_decode_row, channel_row, handoff_blocks, ipc_row
from pdserve.bench.step_timing import best_of, decode_step_s
from pdserve.engine import Engine, EngineConfig, SamplingParams
from pdserve.engine.quantization import weight_bytes
from pdserve.engine.shapes import shape

# Published peaks (dense bf16 FLOP/s, HBM bytes/s), matched against the device's name in this order (the PCIe and
# NVL parts before the SXM ones whose names they contain); CPUs get no MBU/MFU.
PEAKS = (("H100 PCIe", (756e12, 2.0e12)), ("H100 NVL", (835e12, 3.9e12)), ("H200 NVL", (835e12, 4.8e12)),
         ("H200", (989e12, 4.8e12)), ("H100", (989e12, 3.35e12)), ("A100", (312e12, 2.0e12)))


@dataclass
class Check:
    section: str
    name: str
    value: str = ""
    detail: dict = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class Plan:
    device: str
    shape: str
    batches: tuple[int, ...]
    prompt_lengths: tuple[int, ...]
    decode_tokens: int
    variants: tuple[tuple[str, dict], ...]
    long_contexts: tuple[tuple[int, int], ...] = ((1, 4096), (8, 2048))
    """(batch, context tokens) decode rows beyond the 128-token ones: where attention, not the weights, is the read."""
    verify_batches: tuple[int, ...] = (1, 32)
    verify_proposals: tuple[int, ...] = (0, 1, 2, 4, 8)
    """k, the proposals a verify step checks per request (0: a plain decode step, what the others are compared with)."""
    dtype: str = "bf16"
    """Of the decode and prefill engines (fp32 on CPU, where bf16 arithmetic is emulated and slow)."""


FULL_VARIANTS = (("bf16, CUDA graphs", {}), ("bf16, eager", {"cuda_graphs": False}),
                 ("int8, CUDA graphs", {"quantization": "int8"}), ("int4, CUDA graphs", {"quantization": "int4"}),
                 ("w8a8, CUDA graphs", {"quantization": "w8a8"}))


def plan_for(args: argparse.Namespace) -> Plan:
    if args.quick:
        return Plan(args.device, "smollm2-135m", (1, 4), (64,), 8,
                    (("fp32", {}), ("int8", {"quantization": "int8"})), long_contexts=((1, 512),),
                    verify_batches=(1, 4),
                    verify_proposals=(0, 8), dtype="fp32")
    return Plan(args.device, args.shape, (1, 8, 64), (512, 2048, 8192), 64, FULL_VARIANTS)


def peaks(device: str) -> tuple[float, float] | None:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((p for key, p in PEAKS if key in name), None)


@dataclass
class Report:
    """The rows so far, written to both files after every row: a run stopped by its timeout keeps what it measured."""

    out_dir: str
    header: str
    checks: list[Check] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def add(self, check: Check) -> None:
        self.checks.append(check)
        self.write()

    def write(self) -> str:
        """Both files, with the rows so far; returns the markdown table."""
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, "gpu_check.json"), "w") as f:
            json.dump({"header": self.header, "seconds": time.perf_counter() - self.started,
                       "checks": [c.__dict__ for c in self.checks]}, f, indent=1)
        table = markdown(self.checks, self.header)
        with open(os.path.join(self.out_dir, "gpu_check.md"), "w") as f:
            f.write(table)
        return table


def attempt(report: Report, section: str, name: str, fn: Callable[[Check], None]) -> bool:
    """Run one row; whether it succeeded."""
    check = Check(section, name)
    try:
        fn(check)
    except Exception as exc:  # noqa: BLE001 - a failed row is reported as such; the others still run
        check.error = f"{type(exc).__name__}: {exc}"
        check.detail["traceback"] = traceback.format_exc(limit=6)
    report.add(check)
    print(f"[{section}] {name}: {check.error or check.value}", flush=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return check.error is None


# ---- correctness ----------------------------------------------------------------------------------------------
def small_llama_folder(folder: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger weights than the default init, so logits are far from uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(folder, safe_serialization=True)


def agreement(device: str, folder: str, dtype: str, overrides: dict) -> tuple[float, int]:
    """Greedy tokens of our engine vs transformers on the same device and dtype: (share of tokens equal up to the
    first difference, tokens compared)."""
    from transformers import LlamaForCausalLM

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    reference = LlamaForCausalLM.from_pretrained(folder, dtype=torch_dtype).to(device).eval()
    engine = Engine(EngineConfig(model=folder, device=device, dtype=dtype, num_kv_blocks=256,
                                 max_num_batched_tokens=256, prefix_caching=False, **overrides))
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (7, 90, 300, 1)]
    tokens = 24
    ours = engine.generate(prompts, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
    same = 0
    for prompt, output in zip(prompts, ours):
        with torch.inference_mode():
            out = reference.generate(torch.tensor([prompt], device=device), max_new_tokens=tokens,
                                     min_new_tokens=tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
        theirs = out[0, len(prompt):].tolist()
        same += next((i for i, (a, b) in enumerate(zip(output.token_ids, theirs)) if a != b), tokens)
    return same / (tokens * len(prompts)), tokens * len(prompts)


def correctness(report: Report, plan: Plan) -> None:
    paths = [("torch attention", {"attention": "torch"})]
    if plan.device.startswith("cuda"):
        paths.insert(0, ("paged kernels + CUDA graphs", {"attention": "triton"}))
    with tempfile.TemporaryDirectory(prefix="pdserve-gpu-check-") as folder:
        def write_llama(check: Check) -> None:
            small_llama_folder(folder)
            check.value = "saved (4 layers, hidden 256, vocab 512)"

        if not attempt(report, "correctness", "a small random Llama in transformers", write_llama):
            return
        for dtype in ("fp32", "bf16"):
            for label, overrides in paths:
                def run(check: Check, dtype=dtype, overrides=overrides) -> None:
                    share, count = agreement(plan.device, folder, dtype, overrides)
                    check.value = f"{share:.1%} of {count} tokens"
                    check.detail = {"agreement": share, "tokens": count}
                attempt(report, "correctness", f"{dtype}, {label}", run)


# ---- decode and prefill ---------------------------------------------------------------------------------------
def engine_for(plan: Plan, overrides: dict, max_tokens_per_step: int) -> Engine:
    settings = dict(model=f"random:{plan.shape}", device=plan.device, dtype=plan.dtype,
                    num_kv_blocks=4096 if plan.device.startswith("cuda") else 256,
                    max_num_seqs=max(plan.batches + plan.verify_batches), max_num_batched_tokens=max_tokens_per_step,
                    max_model_len=16384 if plan.device.startswith("cuda") else 2048, prefix_caching=False)
    return Engine(EngineConfig(**{**settings, **overrides}))


def loaded_engine(report: Report, section: str, label: str, plan: Plan, overrides: dict,
                  max_tokens_per_step: int) -> Engine | None:
    """The engine for a section's rows, its load recorded as a row of its own; None if it failed."""
    engines: list[Engine] = []

    def build(check: Check) -> None:
        engines.append(engine_for(plan, overrides, max_tokens_per_step))
        check.value = f"{weight_bytes(engines[0].model) / 2**30:.2f} GiB of weights"

    attempt(report, section, f"{label}: load", build)
    return engines[0] if engines else None


def decode(report: Report, plan: Plan, peak: tuple[float, float] | None) -> None:
    cfg = shape(plan.shape)
    kv_bytes_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * (2 if plan.dtype == "bf16" else 4)
    tokens = plan.decode_tokens
    cases = [(batch, 128) for batch in plan.batches] + list(plan.long_contexts)
    for label, overrides in plan.variants:
        engine = loaded_engine(report, "decode", label, plan, overrides, 4096)
        if engine is None:
            continue
        gen = torch.Generator().manual_seed(2)
        for batch, prompt_len in cases:
            def run(check: Check, batch=batch, prompt_len=prompt_len, engine=engine, gen=gen) -> None:
                prompts = [torch.randint(10, cfg.vocab_size, (prompt_len,), generator=gen).tolist()
                           for _ in range(batch)]
                decode_step_s(engine, prompts, 4)  # warm up
                step = decode_step_s(engine, prompts, tokens)
                read = (weight_bytes(engine.model) - engine.model.embed.numel() * engine.model.embed.element_size()
                        + batch * (prompt_len + tokens / 2) * kv_bytes_per_token)
                check.detail = {"tok_s": batch / step, "step_ms": step * 1e3, "bytes_per_step": read}
                check.value = f"{batch / step:.1f} tok/s, {step * 1e3:.2f} ms/step"
                if peak is not None:
                    check.detail["mbu"] = read / step / peak[1]
                    check.value += f", MBU {check.detail['mbu']:.1%}"
            context = "" if prompt_len == 128 else f", {prompt_len}-token context"
            attempt(report, "decode", f"{label}: batch {batch}{context}", run)
        del engine, run  # `run` holds the engine too: the next variant's weights load without this one's


def prefill(report: Report, plan: Plan, peak: tuple[float, float] | None) -> None:
    cfg = shape(plan.shape)
    dense = cfg.num_parameters() - cfg.vocab_size * cfg.hidden_size  # the embedding table is a lookup
    engine = loaded_engine(report, "prefill", plan.dtype, plan, {}, max(plan.prompt_lengths))
    if engine is None:
        return
    gen = torch.Generator().manual_seed(3)
    for length in plan.prompt_lengths:
        def run(check: Check, length=length) -> None:
            prompt = torch.randint(10, cfg.vocab_size, (length,), generator=gen).tolist()
            once = SamplingParams(max_tokens=1, temperature=0)
            engine.generate([prompt], once)  # warm up
            seconds = best_of(3, lambda: engine.generate([prompt], once), engine.kv_cache.tensor.device)
            attention = 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * length * length  # causal QK^T and PV
            flops = 2 * dense * length + attention
            check.detail = {"tok_s": length / seconds, "ms": seconds * 1e3, "flops": flops}
            check.value = f"{length / seconds:.0f} tok/s, {seconds * 1e3:.1f} ms"
            if peak is not None:
                check.detail["mfu"] = flops / seconds / peak[0]
                check.value += f", MFU {check.detail['mfu']:.1%}"
        attempt(report, "prefill", f"{plan.dtype}: {length} tokens", run)


VERIFY_CONTEXT = 128


def verify(report: Report, plan: Plan) -> None:
    """A verify step of k proposals per request is one forward pass of k + 1 new tokens per request over its context:
    timed as the first token of a prompt whose first VERIFY_CONTEXT tokens the prefix cache holds. Without CUDA
    graphs: k = 0 (one new token each) would replay a decode graph while k > 0 runs eager, and the ratio would
    measure the launches, not the verify step."""
    cfg = shape(plan.shape)
    engine = loaded_engine(report, "verify", plan.dtype, plan, {"prefix_caching": True, "cuda_graphs": False}, 4096)
    if engine is None:
        return
    gen = torch.Generator().manual_seed(4)
    once = SamplingParams(max_tokens=1, temperature=0)
    for batch in plan.verify_batches:
        contexts = [torch.randint(10, cfg.vocab_size, (VERIFY_CONTEXT,), generator=gen).tolist() for _ in range(batch)]
        def cache(check: Check, contexts=contexts, batch=batch) -> None:
            engine.generate(contexts, once)  # their KV is cached from now on (whole blocks)
            check.value = f"{batch} x {VERIFY_CONTEXT} tokens in the prefix cache"

        if not attempt(report, "verify", f"{plan.dtype}: batch {batch}, {VERIFY_CONTEXT}-token contexts cached", cache):
            continue
        plain: list[float] = []
        for k in plan.verify_proposals:
            def run(check: Check, k=k, contexts=contexts, plain=plain) -> None:
                prompts = [c + c[:k + 1] for c in contexts]
                engine.generate(prompts, once)  # warm up this shape
                seconds = best_of(3, lambda: engine.generate(prompts, once), engine.kv_cache.tensor.device)
                if k == 0:
                    plain.append(seconds)
                check.detail = {"ms": seconds * 1e3, "vs_k0": seconds / plain[0]}
                check.value = f"{seconds * 1e3:.2f} ms, {seconds / plain[0]:.2f}x the k = 0 step"
            attempt(report, "verify", f"{plan.dtype}: batch {batch}, k {k}", run)


def kv(report: Report, plan: Plan) -> None:
    engine = loaded_engine(report, "kv", plan.dtype, plan, {}, 4096)
    if engine is None:
        return
    engine.kv_cache.tensor.normal_()  # not zeros, which a handoff that moved nothing would leave "intact"
    blocks = handoff_blocks(engine)
    for name, row in (("handoff in place over the loopback", channel_row),
                      ("IPC handoff, two processes (CUDA IPC on a GPU)", ipc_row),
                      (f"decode batch {DECODE_BATCH} beside handoffs", beside_decode_row)):
        def run(check: Check, row=row) -> None:
            check.value, check.detail = row(engine, blocks)
        attempt(report, "kv", f"{plan.dtype}: {name}", run)


def markdown(checks: list[Check], header: str) -> str:
    lines = [header, "", "| section | check | result |", "|---|---|---|"]
    for c in checks:
        lines.append(f"| {c.section} | {c.name} | {('**failed**: ' + c.error) if c.error else c.value} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", default="llama-3-8b")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smollm2-135m shape), for CI on CPU")
    parser.add_argument("--out-dir", default=os.environ.get("OUT") or "gpu_check_out")
    parser.add_argument("--skip", nargs="*", default=(),
                        choices=("correctness", "decode", "prefill", "verify", "kv"))
    args = parser.parse_args()
    plan = plan_for(args)
    peak = peaks(plan.device)
    name = torch.cuda.get_device_name(torch.device(plan.device)) if plan.device.startswith("cuda") else "cpu"
    header = (f"gpu_check {time.strftime('%Y-%m-%d')}: {name}, torch {torch.__version__}, shape {plan.shape}"
              + (f", peaks {peak[0] / 1e12:.0f} TFLOP/s bf16, {peak[1] / 1e12:.2f} TB/s" if peak else ""))
    print(header, flush=True)
    report = Report(args.out_dir, header)
    report.write()
    for section, fn in (("correctness", lambda: correctness(report, plan)),
                        ("decode", lambda: decode(report, plan, peak)),
                        ("prefill", lambda: prefill(report, plan, peak)),
                        ("verify", lambda: verify(report, plan)),
                        ("kv", lambda: kv(report, plan))):
        if section not in args.skip:
            fn()
    print(report.write())


if __name__ == "__main__":
    main()
