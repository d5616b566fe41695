"""pdserve.client against fake routers over real gRPC on 127.0.0.1: the sync and async clients collect a stream,
retry UNAVAILABLE with the same request id, resume a stream that broke after its router took it (with the tokens
received, each token once), move on to the next router given, keep their deadline, send the bearer token, and fill
the admin requests."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from pdserve.client import Client, SyncClient, build_request
from pdserve.engine import Prompt, SamplingParams
from pdserve.proto import generation_pb2 as pb
from pdserve.proto import generation_pb2_grpc as pb_grpc

FAST = {"backoff_s": 0.01}  # retries without waiting
UNAVAILABLE, INVALID = grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INVALID_ARGUMENT


class FakeGeneration(pb_grpc.GenerationServicer):
    """Fails its first `fail_first` calls with `code`, then streams three tokens (from where a resumed request's
    client left off); `break_after_first` aborts its first call with UNAVAILABLE after one message; `accept` sends the
    initial metadata of a router that took the request first; `sleep_s` holds each call that long first."""

    def __init__(self, fail_first: int = 0, code: grpc.StatusCode = UNAVAILABLE, break_after_first: bool = False,
                 sleep_s: float = 0.0, accept: bool = False) -> None:
        self.fail_first, self.code, self.break_after_first, self.sleep_s = fail_first, code, break_after_first, sleep_s
        self.accept = accept
        self.requests: list[pb.GenerateRequest] = []
        self.metadata: list[dict] = []
        self.lock = threading.Lock()

    @property
    def request_ids(self) -> list[str]:
        return [r.request_id for r in self.requests]

    def Generate(self, request, context):
        with self.lock:
            self.requests.append(request)
            self.metadata.append(dict(context.invocation_metadata()))
            n = len(self.requests)
        end = time.monotonic() + self.sleep_s
        while context.is_active() and time.monotonic() < end:
            time.sleep(0.01)
        if self.accept:
            context.send_initial_metadata((("pdserve-accepted", "router-fake"),))
        if n <= self.fail_first:
            context.abort(self.code, f"call {n} refused")
        for i in range(request.resume.tokens_received, 3):
            last = i == 2
            yield pb.GenerateResponse(request_id=request.request_id, token_ids=[10 + i], text=f"t{i} ",
                                      prompt_tokens=5 if i in (0, 2) else 0, completion_tokens=3 if last else 0,
                                      finish_reason=pb.FINISH_REASON_LENGTH if last else 0,
                                      timings=pb.Timings(e2e_s=1.5) if last else None)
            if self.break_after_first and n == 1:
                context.abort(UNAVAILABLE, "router going away")


class FakeAdmin(pb_grpc.AdminServicer):
    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.calls: list[tuple[str, object]] = []
        self.metadata: list[dict] = []

    def _record(self, name, request, context):
        self.calls.append((name, request))
        self.metadata.append(dict(context.invocation_metadata()))
        if len(self.calls) <= self.fail_first:
            context.abort(UNAVAILABLE, "router restarting")

    def Status(self, request, context):
        self._record("Status", request, context)
        return pb.StatusResponse(mode="disaggregated", workers=[pb.WorkerStatus(worker_id="decode-0")])

    def Health(self, request, context):
        self._record("Health", request, context)
        return pb.HealthResponse(healthy=True, detail="serving")

    def Scale(self, request, context):
        self._record("Scale", request, context)
        return pb.ScaleResponse(started=["decode-1"])

    def Drain(self, request, context):
        self._record("Drain", request, context)
        return pb.DrainResponse(stopped=request.worker_id, started="decode-9" if request.replace else "")


@pytest.fixture
def serve(monkeypatch):
    """serve(generation=..., admin=...) -> the address of a gRPC server on 127.0.0.1 answering with those fakes."""
    monkeypatch.delenv("PDSERVE_TOKEN", raising=False)
    servers = []

    def start(generation: FakeGeneration | None = None, admin: FakeAdmin | None = None) -> str:
        server = grpc.server(ThreadPoolExecutor(max_workers=8))
        pb_grpc.add_GenerationServicer_to_server(generation or FakeGeneration(), server)
        pb_grpc.add_AdminServicer_to_server(admin or FakeAdmin(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(0).wait(5)


def run_async(coro_fn, address: str, **kwargs):
    async def go():
        async with Client(address, **{"timeout_s": 10, **kwargs}) as client:
            return await coro_fn(client)
    return asyncio.run(go())


def assert_full(completion, request_id: str) -> None:
    assert completion.request_id == request_id
    assert completion.token_ids == (10, 11, 12) and completion.text == "t0 t1 t2 "
    assert completion.finish_reason == "length" and completion.prompt_tokens == 5
    assert completion.timings.e2e_s == 1.5


def test_sync_generate_collects_the_stream_with_a_client_made_request_id(serve):
    fake = FakeGeneration()
    with SyncClient(serve(fake), timeout_s=10) as client:
        completion = client.generate("Hello")  # a str is a text prompt; sampling defaults
        streamed = list(client.stream(Prompt(token_ids=(1, 2)), SamplingParams(max_tokens=3, seed=7), "mine"))
    (made, given) = fake.requests
    assert made.request_id.startswith("req-") and len(made.request_id) == len("req-") + 32
    assert_full(completion, made.request_id)
    assert made.text == "Hello" and made.sampling.max_tokens == 16 and not made.sampling.HasField("seed")
    assert given.request_id == "mine" and list(given.token_ids.ids) == [1, 2] and given.sampling.seed == 7
    assert [r.text for r in streamed] == ["t0 ", "t1 ", "t2 "]


def test_async_generate_stream_and_read(serve):
    fake = FakeGeneration()

    async def go(client):
        completion = await client.generate(Prompt(text="Hi"), SamplingParams(max_tokens=3, temperature=0))
        texts = [r.text async for r in client.stream("Hi")]
        stream = client.stream("Hi", request_id="by-read")
        read = []
        while (response := await stream.read()) is not grpc.aio.EOF:
            read.append(response.request_id)
        return completion, texts, read, await stream.code()

    completion, texts, read, code = run_async(go, serve(fake))
    assert_full(completion, fake.request_ids[0])
    assert fake.requests[0].sampling.max_tokens == 3 and fake.requests[0].sampling.temperature == 0
    assert texts == ["t0 ", "t1 ", "t2 "]
    assert read == ["by-read"] * 3 and code is grpc.StatusCode.OK  # other attributes are the grpc call's


@pytest.mark.parametrize("given_id", ["", "caller-7"])
def test_a_retry_after_unavailable_reuses_the_request_id(serve, given_id):
    sync_fake, async_fake = FakeGeneration(fail_first=2), FakeGeneration(fail_first=2)
    with SyncClient(serve(sync_fake), timeout_s=10, **FAST) as client:
        sync_completion = client.generate("Hello", request_id=given_id)
    async_completion = run_async(lambda c: c.generate("Hello", request_id=given_id), serve(async_fake), **FAST)
    for fake, completion in ((sync_fake, sync_completion), (async_fake, async_completion)):
        assert len(fake.requests) == 3 and len(set(fake.request_ids)) == 1
        assert fake.request_ids[0] == (given_id or fake.request_ids[0]) and fake.request_ids[0].startswith(
            given_id or "req-")
        assert_full(completion, fake.request_ids[0])


def test_retries_stop_after_the_budget_with_unavailable(serve):
    sync_fake, async_fake = FakeGeneration(fail_first=100), FakeGeneration(fail_first=100)
    with SyncClient(serve(sync_fake), timeout_s=10, retries=2, **FAST) as client:
        with pytest.raises(grpc.RpcError) as sync_error:
            client.generate("Hello")
    with pytest.raises(grpc.aio.AioRpcError) as async_error:
        run_async(lambda c: c.generate("Hello"), serve(async_fake), retries=2, **FAST)
    for fake, error in ((sync_fake, sync_error), (async_fake, async_error)):
        assert error.value.code() is UNAVAILABLE and "call 3 refused" in error.value.details()
        assert len(fake.requests) == 3  # the first call and two retries


def test_a_stream_that_breaks_after_a_token_resumes_with_what_it_has(serve):
    sync_fake, async_fake = FakeGeneration(break_after_first=True), FakeGeneration(break_after_first=True)
    with SyncClient(serve(sync_fake), timeout_s=10, retries=0, **FAST) as client:
        sync_texts = [r.text for r in client.stream("Hello")]
    async_completion = run_async(lambda c: c.generate("Hello"), serve(async_fake), retries=0, **FAST)
    assert sync_texts == ["t0 ", "t1 ", "t2 "]
    assert_full(async_completion, async_fake.request_ids[0])  # every token once
    for fake in (sync_fake, async_fake):
        first, again = fake.requests
        assert again.request_id == first.request_id and not first.HasField("resume")
        assert again.resume.tokens_received == 1 and list(again.resume.token_ids) == [10]
        assert again.text == first.text and again.sampling == first.sampling


def test_a_request_its_router_took_resumes_even_before_its_first_token(serve):
    """The router's initial metadata said it took the request; the stream broke before any token: the client
    reconnects (whatever `retries` says) and resumes from nothing."""
    fake = FakeGeneration(fail_first=1, accept=True)
    with SyncClient(serve(fake), timeout_s=10, retries=0, **FAST) as client:
        completion = client.generate("Hello")
    assert_full(completion, fake.request_ids[0])
    assert [r.HasField("resume") for r in fake.requests] == [False, True]
    assert fake.requests[1].resume.tokens_received == 0


def test_calls_and_resumes_move_on_to_the_next_router_given(serve):
    down, up = FakeGeneration(fail_first=100), FakeGeneration()
    with SyncClient(f"{serve(down)}, {serve(up)}", timeout_s=10, **FAST) as client:
        assert_full(client.generate("Hello"), up.request_ids[0])
    assert len(down.requests) == 1 and len(up.requests) == 1

    breaks, takes_over = FakeGeneration(break_after_first=True), FakeGeneration()
    completion = run_async(lambda c: c.generate("Hello"), [serve(breaks), serve(takes_over)], **FAST)
    assert_full(completion, breaks.request_ids[0])
    assert takes_over.requests[0].resume.tokens_received == 1 and takes_over.request_ids == breaks.request_ids


def test_reconnecting_gives_up_after_reconnect_s(serve):
    class BreaksThenDown(FakeGeneration):
        def Generate(self, request, context):
            if request.HasField("resume"):
                self.requests.append(request)
                context.abort(UNAVAILABLE, "router down")
            yield from super().Generate(request, context)

    fake = BreaksThenDown(break_after_first=True)
    started = time.monotonic()
    with SyncClient(serve(fake), timeout_s=30, backoff_s=0.05, reconnect_s=0.6) as client:
        stream = client.stream("Hello")
        assert next(stream).text == "t0 "
        with pytest.raises(grpc.RpcError) as error:
            list(stream)
    assert error.value.code() is UNAVAILABLE and 0.3 < time.monotonic() - started < 5  # no backoff past the window
    assert len(fake.requests) > 2 and stream.token_ids == [10]


@pytest.mark.parametrize("code", [INVALID, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ALREADY_EXISTS])
def test_other_codes_are_not_retried(serve, code):
    sync_fake, async_fake = FakeGeneration(fail_first=1, code=code), FakeGeneration(fail_first=1, code=code)
    with SyncClient(serve(sync_fake), timeout_s=10, **FAST) as client:
        with pytest.raises(grpc.RpcError) as sync_error:
            client.generate("Hello")
    with pytest.raises(grpc.aio.AioRpcError) as async_error:
        run_async(lambda c: c.generate("Hello"), serve(async_fake), **FAST)
    assert sync_error.value.code() is code and async_error.value.code() is code
    assert len(sync_fake.requests) == 1 and len(async_fake.requests) == 1


def test_timeout_gives_deadline_exceeded(serve):
    address = serve(FakeGeneration(sleep_s=5))
    start = time.monotonic()
    with SyncClient(address, timeout_s=0.3) as client:
        with pytest.raises(grpc.RpcError) as sync_error:
            client.generate("Hello")
    with pytest.raises(grpc.aio.AioRpcError) as async_error:
        run_async(lambda c: c.generate("Hello"), address, timeout_s=0.3)
    assert sync_error.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert async_error.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 3


def test_the_deadline_covers_the_retries(serve):
    fake = FakeGeneration(fail_first=100)
    start = time.monotonic()
    with SyncClient(serve(fake), timeout_s=0.5, retries=10, backoff_s=0.2) as client:
        with pytest.raises(grpc.RpcError) as error:
            client.generate("Hello")
    assert error.value.code() is UNAVAILABLE  # the backoff past the deadline is not taken: the last error
    assert time.monotonic() - start < 1.5 and 1 < len(fake.requests) < 11


def test_cancel_ends_the_stream_without_retry(serve):
    fake = FakeGeneration(sleep_s=5)
    with SyncClient(serve(fake), timeout_s=10, **FAST) as client:
        stream = client.stream("Hello")
        threading.Timer(0.2, stream.cancel).start()
        with pytest.raises(grpc.RpcError) as error:
            next(stream)
    assert error.value.code() is grpc.StatusCode.CANCELLED and len(fake.requests) == 1

    fake = FakeGeneration(fail_first=100)  # cancelled during the backoff: no further attempt
    with SyncClient(serve(fake), timeout_s=10, backoff_s=0.5) as client:
        stream = client.stream("Hello")
        threading.Timer(0.2, stream.cancel).start()
        with pytest.raises(grpc.RpcError) as error:
            next(stream)
    assert error.value.code() is UNAVAILABLE and len(fake.requests) == 1

    fake = FakeGeneration(sleep_s=5)

    async def go(client):  # as tests/integration/test_cluster_cancel.py uses it
        stream = client.stream("Hello")
        reader = asyncio.ensure_future(stream.read())
        await asyncio.sleep(0.2)
        assert not reader.done()
        stream.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(reader, 5)
        return await stream.code()

    assert run_async(go, serve(fake), **FAST) is grpc.StatusCode.CANCELLED and len(fake.requests) == 1


def test_the_bearer_token_is_sent(serve):
    fake, admin = FakeGeneration(), FakeAdmin()
    address = serve(fake, admin)
    with SyncClient(address, timeout_s=10, token="s3cret") as client:
        client.generate("Hello")
        client.health()
    run_async(lambda c: c.generate("Hello"), address, token="s3cret")
    run_async(lambda c: c.status(), address, token="s3cret")
    with SyncClient(address, timeout_s=10) as client:
        client.health()
    bearer = [m.get("authorization") for m in fake.metadata + admin.metadata]
    assert bearer == ["Bearer s3cret"] * 4 + [None]


def test_admin_calls_send_their_fields(serve):
    admin = FakeAdmin()
    address = serve(admin=admin)
    with SyncClient(address, timeout_s=10) as client:
        assert client.status().workers[0].worker_id == "decode-0"
        assert client.health().healthy
        assert list(client.scale(decode=2).started) == ["decode-1"]
        assert client.drain("decode-0", replace=True).started == "decode-9"

    async def go(client):
        return await client.scale(prefill=1, colocated=0), await client.drain("prefill-3")

    scaled, drained = run_async(go, address)
    assert list(scaled.started) == ["decode-1"] and drained.stopped == "prefill-3" and not drained.started
    calls = dict(enumerate(admin.calls))
    assert [name for name, _ in admin.calls] == ["Status", "Health", "Scale", "Drain", "Scale", "Drain"]
    sync_scale, async_scale = calls[2][1], calls[4][1]
    assert sync_scale.decode == 2 and not sync_scale.HasField("prefill") and not sync_scale.HasField("colocated")
    assert async_scale.prefill == 1 and async_scale.HasField("colocated") and async_scale.colocated == 0
    assert not async_scale.HasField("decode")
    assert (calls[3][1].worker_id, calls[3][1].replace) == ("decode-0", True)
    assert (calls[5][1].worker_id, calls[5][1].replace) == ("prefill-3", False)


def test_status_is_retried_but_drain_is_not(serve):
    admin = FakeAdmin(fail_first=1)
    with SyncClient(serve(admin=admin), timeout_s=10, **FAST) as client:
        assert client.status().mode == "disaggregated"
    assert [name for name, _ in admin.calls] == ["Status", "Status"]

    admin = FakeAdmin(fail_first=1)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        run_async(lambda c: c.drain("decode-0"), serve(admin=admin), **FAST)
    assert error.value.code() is UNAVAILABLE and [name for name, _ in admin.calls] == ["Drain"]


def test_build_request_takes_a_str_and_default_sampling():
    request = build_request("Hi")
    assert request.text == "Hi" and request.request_id == ""
    assert request.sampling.max_tokens == SamplingParams().max_tokens
