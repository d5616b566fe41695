"""A batch's input and output files (`router.batch_lines`), without a cluster: each bad input line named by its
number and field; answers appended as they come, and after a restart a half-written last line cut and the answered
custom ids known, so no line is answered twice."""

import json

from pdserve.router.batch_lines import ResultFiles, read_input


def write(path, rows: list) -> str:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def line(custom_id: str, url: str = "/v1/completions", **extra) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": {"prompt": "hi"}, **extra}


def test_good_lines_are_read_in_order_and_blank_lines_skipped(tmp_path):
    lines, errors = read_input(write(tmp_path / "in.jsonl", [line("a"), "", line("b")]), "/v1/completions")
    assert errors == [] and [(x.index, x.custom_id) for x in lines] == [(0, "a"), (2, "b")]


def test_each_bad_line_is_named_by_its_number_and_field(tmp_path):
    rows = [line("a"), line("a"), line("c", url="/v1/chat/completions"), line("d", method="GET"), "[1]", "{oops",
            {"custom_id": "", "method": "POST", "url": "/v1/completions", "body": {}},
            {"custom_id": "f", "method": "POST", "url": "/v1/completions", "body": "text"}]
    _, errors = read_input(write(tmp_path / "in.jsonl", rows), "/v1/completions")
    assert [(e.line, e.param) for e in errors] == [(2, "custom_id"), (3, "url"), (4, "method"), (5, None), (6, None),
                                                   (7, "custom_id"), (8, "body")]
    assert "used twice" in errors[0].message and "/v1/completions" in errors[1].message


def test_an_empty_file_is_an_error(tmp_path):
    (tmp_path / "in.jsonl").write_text("\n\n")
    lines, errors = read_input(str(tmp_path / "in.jsonl"), "/v1/completions")
    assert lines == [] and len(errors) == 1 and "no requests" in errors[0].message


def test_answers_survive_a_restart_and_a_half_written_line_is_cut(tmp_path):
    out, err = str(tmp_path / "out.jsonl"), str(tmp_path / "err.jsonl")
    files = ResultFiles(out, err)
    files.answered("a", "r-0", 200, {"choices": []})
    files.answered("b", "r-1", 400, {"error": {"message": "max_tokens: too many"}})
    files.close()
    with open(out, "a") as f:
        f.write('{"id": "batch_req_x", "custom_id": "c", "respo')  # the router died mid-write
    again = ResultFiles(out, err)
    assert again.done == {"a", "b"} and (again.completed, again.failed) == (1, 1)
    again.answered("c", "r-2", 200, {"choices": []})
    again.close()
    answered = [json.loads(x) for x in open(out)]
    assert [x["custom_id"] for x in answered] == ["a", "c"]
    assert answered[0]["response"] == {"status_code": 200, "request_id": "r-0", "body": {"choices": []}}
