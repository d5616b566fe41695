"""`pdserve generate` end to end, in a subprocess, on the real model."""

import json
import subprocess
import sys

import pytest

LINES = [
    {"prompt": "The quick brown fox"},
    {"messages": [{"role": "user", "content": "What is the capital of France?"}], "request_id": "capital"},
    {"token_ids": [504, 2365, 6354]},
]


def _pdserve(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pdserve.cli", *args], input=stdin, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("cli") / "in.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in LINES) + "\n")
    return str(path)


def test_generate_json_lines_in_input_order_match_transformers(jsonl, reference_greedy):
    done = _pdserve("generate", "--engine", "local", "--input", jsonl, "--max-tokens", "12", "--temperature", "0",
                    "--json")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["request_id"] for r in rows] == ["req-1", "capital", "req-3"]
    assert rows[2]["prompt_token_ids"] == [504, 2365, 6354]
    for row in rows:
        assert set(row) == {"request_id", "prompt_token_ids", "token_ids", "text", "finish_reason"}
        assert row["token_ids"] == reference_greedy(row["prompt_token_ids"], 12)
    assert "Paris" in rows[1]["text"] and rows[1]["finish_reason"] == "stop"
    assert rows[0]["finish_reason"] == "length" and len(rows[0]["token_ids"]) == 12


def test_bare_prompt_prints_the_reply():
    done = _pdserve("generate", "What is the capital of France?", "--max-tokens", "16")
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout


def test_bad_input_line_is_named_and_exit_code_2():
    done = _pdserve("generate", "--input", "-", stdin='{"prompt": "ok"}\n{"messages": [{"role": "ro bot", '
                                                       '"content": "hi"}]}\n')
    assert done.returncode == 2
    assert "input line 2" in done.stderr and "role" in done.stderr


def test_bad_sampling_value_is_named():
    done = _pdserve("generate", "hello", "--top-p", "1.5")
    assert done.returncode == 2 and "top_p" in done.stderr
