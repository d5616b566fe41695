"""`pdserve generate`: run prompts through an engine and print the results.

    pdserve generate "some prompt"                                   # prints the reply (chat; --raw: completion)
    pdserve generate --engine local --input FILE.jsonl --max-tokens N --temperature 0 [--seed S] [--json]
    pdserve generate --router HOST:PORT[,HOST:PORT] --input FILE.jsonl --concurrency N ...   # through a cluster

Each input line is {"prompt": "..."}, {"messages": [{"role", "content"}, ...]} or {"token_ids": [...]}, with an
optional "request_id". All lines are submitted at once so they batch together. With --json each output line is
{"request_id", "prompt_token_ids", "token_ids", "text", "finish_reason"}, in input order.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import TextIO

from pdserve.engine.config import SPECULATIVE_METHODS, ConfigError, EngineConfig, SpeculativeSettings
from pdserve.engine.model_source import DEFAULT_MODEL
from pdserve.engine.request import Message, Prompt, PromptError, RequestOutput
from pdserve.engine.sampling_params import SamplingError, SamplingParams


class InputError(ValueError):
    """An input line is malformed; the message names the line."""


@dataclass(frozen=True)
class InputLine:
    request_id: str
    prompt: Prompt


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("generate", help="generate text for prompts", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="?", help="a single prompt, sent as a chat user message (instead of --input)")
    p.add_argument("--raw", action="store_true", help="send PROMPT as plain completion text, not as a chat message")
    p.add_argument("--engine", choices=["local"], default="local", help="where to run: local = in this process")
    p.add_argument("--router", metavar="HOST:PORT[,HOST:PORT]",
                   help="send the prompts to a running cluster's router instead (several: the next one takes over "
                        "when one fails)")
    p.add_argument("--concurrency", type=int, default=16, help="with --router: requests in flight at once")
    p.add_argument("--input", metavar="FILE.jsonl", help="prompts, one JSON object a line ('-' for stdin)")
    p.add_argument("--json", action="store_true", help="print one JSON object per request")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None, help="every request samples with this seed")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="GGUF file, Hugging Face folder, or random:SHAPE")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--speculative", choices=list(SPECULATIVE_METHODS), default="none",
                   help="local engine: speculative decoding (greedy output stays the same; sampled output keeps its "
                        "distribution); draft: the model with int4 layers proposes; lookahead: greedy requests only")
    p.set_defaults(run=run)


def read_lines(stream: TextIO) -> list[InputLine]:
    lines = []
    for number, raw in enumerate(stream, start=1):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw)
            if not isinstance(value, dict):
                raise PromptError("must be a JSON object")
            prompt = Prompt.from_json(value)
        except (json.JSONDecodeError, PromptError, TypeError, ValueError) as e:
            raise InputError(f"input line {number}: {e}") from e
        lines.append(InputLine(str(value.get("request_id", f"req-{number}")), prompt))
    if not lines:
        raise InputError("input: no prompts")
    return lines


def output_json(line: InputLine, output: RequestOutput) -> str:
    return json.dumps({
        "request_id": line.request_id,
        "prompt_token_ids": list(output.prompt_token_ids),
        "token_ids": list(output.token_ids),
        "text": output.text,
        "finish_reason": output.finish_reason.value if output.finish_reason else None,
    })


def run(args: argparse.Namespace) -> int:
    try:
        lines = _inputs(args)
        sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                  top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))
        if args.router:
            return _through_router(args, lines, sampling)
        outputs = _generate_here(args, lines, sampling)
    except (InputError, ConfigError, SamplingError, PromptError, OSError) as e:
        print(f"pdserve generate: {e}", file=sys.stderr)
        return 2
    for line, output in zip(lines, outputs):
        print(output_json(line, output) if args.json else output.text, flush=True)
    return 0


def _generate_here(args: argparse.Namespace, lines: list[InputLine], sampling: SamplingParams) -> list[RequestOutput]:
    """On an engine in this process (the engine, and torch, are imported only here: `--router` needs neither)."""
    from pdserve.engine.engine import Engine, RequestError

    engine = Engine(EngineConfig(model=args.model, dtype=args.dtype, device=args.device,
                                 speculative=SpeculativeSettings(method=args.speculative)))
    try:
        return engine.generate([line.prompt for line in lines], sampling)
    except RequestError as e:
        raise InputError(str(e)) from e


def _inputs(args: argparse.Namespace) -> list[InputLine]:
    if (args.prompt is None) == (args.input is None):
        raise InputError("give either a PROMPT or --input FILE.jsonl")
    if args.prompt is not None:
        if not args.prompt:
            raise InputError("PROMPT: must not be empty")
        prompt = Prompt(text=args.prompt) if args.raw else Prompt(messages=(Message("user", args.prompt),))
        return [InputLine("req-1", prompt)]
    if args.input == "-":
        return read_lines(sys.stdin)
    with open(args.input, encoding="utf-8") as f:
        return read_lines(f)


def _through_router(args: argparse.Namespace, lines: list[InputLine], sampling: SamplingParams) -> int:
    import asyncio

    import grpc

    from pdserve.client import Client

    if args.concurrency < 1:
        raise InputError(f"--concurrency: must be >= 1, got {args.concurrency}")

    async def send_all() -> list:
        limit = asyncio.Semaphore(args.concurrency)
        async with Client(args.router) as client:
            async def one(line: InputLine):
                async with limit:
                    return await client.generate(line.prompt, sampling)
            return await asyncio.gather(*(one(line) for line in lines), return_exceptions=True)

    failed = 0
    for line, result in zip(lines, asyncio.run(send_all())):
        if isinstance(result, grpc.RpcError):
            print(f"pdserve generate: {line.request_id}: {result.code().name}: {result.details()}", file=sys.stderr)
            failed += 1
        elif isinstance(result, BaseException):
            raise result
        elif args.json:
            print(json.dumps({"request_id": line.request_id, "token_ids": list(result.token_ids), "text": result.text,
                              "finish_reason": result.finish_reason, "prompt_tokens": result.prompt_tokens,
                              "timings": _timings(result.timings)}), flush=True)
        else:
            print(result.text, flush=True)
    return 1 if failed else 0


def _timings(timings) -> dict | None:
    """The router's timings of a request (`pb.Timings`), as JSON: seconds, cached prompt tokens, and the tokens
    speculative decoding proposed and accepted for it."""
    if timings is None:
        return None
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(timings, always_print_fields_with_no_presence=True, preserving_proto_field_name=True)
