"""The gRPC API: the committed generated code matches the .proto, and the stubs stream over loopback."""

import os
from concurrent import futures

import grpc

from pdserve.proto import generate
from pdserve.proto import generation_pb2 as pb
from pdserve.proto import generation_pb2_grpc as pb_grpc


def test_committed_generated_code_is_up_to_date(tmp_path):
    for name in generate.generate(str(tmp_path)):
        with open(os.path.join(generate.HERE, name)) as committed, open(tmp_path / name) as fresh:
            assert committed.read() == fresh.read(), f"{name} is stale: run python -m pdserve.proto.generate"


def test_prompt_is_exactly_one_of_text_messages_or_token_ids():
    request = pb.GenerateRequest(text="hello")
    request.token_ids.ids.extend([1, 2, 3])
    assert request.WhichOneof("prompt") == "token_ids" and request.text == ""
    assert not pb.SamplingParams().HasField("temperature")  # unset is distinguishable from 0 (greedy)


class EchoGeneration(pb_grpc.GenerationServicer):
    """Streams each prompt token back as its own message, then a final one with the finish reason."""

    def Generate(self, request, context):
        for token in request.token_ids.ids:
            yield pb.GenerateResponse(request_id=request.request_id, token_ids=[token])
        yield pb.GenerateResponse(request_id=request.request_id, finish_reason=pb.FINISH_REASON_LENGTH,
                                  timings=pb.Timings(ttft_s=0.5))


def test_generate_streams_over_loopback():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_GenerationServicer_to_server(EchoGeneration(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            request = pb.GenerateRequest(request_id="r1", token_ids=pb.TokenIds(ids=[5, 6, 7]))
            replies = list(pb_grpc.GenerationStub(channel).Generate(request, timeout=10))
        assert [list(r.token_ids) for r in replies] == [[5], [6], [7], []]
        assert replies[-1].finish_reason == pb.FINISH_REASON_LENGTH and replies[-1].timings.ttft_s == 0.5
        assert {r.request_id for r in replies} == {"r1"}
    finally:
        server.stop(grace=None)
