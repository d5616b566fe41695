"""Access control on the router's public port, over real gRPC on 127.0.0.1 (no workers needed): the bearer token
is required on every service, and with a certificate the port speaks TLS only."""

import asyncio
import shutil
import subprocess

import grpc
import pytest

from pdserve.access import Access, load_access
from pdserve.client import Client
from pdserve.config import ConfigError, Router
from pdserve.engine import Prompt, SamplingParams
from pdserve.router.orchestrator import Orchestrator
from pdserve.router.server import build_server

TOKEN = "s3cret-token"


async def serve(access: Access) -> tuple[grpc.aio.Server, str]:
    orchestrator = Orchestrator(registry=None, namespace="test", colocated=False, block_size=16)
    server, port = build_server(None, orchestrator, "127.0.0.1", 0, "disaggregated", access)
    await server.start()
    return server, f"127.0.0.1:{port}"


async def health_code(client: Client) -> grpc.StatusCode:
    try:
        await client.health()
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_bearer_token_is_required_on_every_call():
    async def go():
        server, address = await serve(Access(token=TOKEN))
        try:
            codes = {}
            for name, token in (("right", TOKEN), ("wrong", "guess"), ("missing", "")):
                async with Client(address, timeout_s=5, token=token) as client:
                    codes[name] = await health_code(client)
            async with Client(address, timeout_s=5, token="guess") as client:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await client.generate(Prompt(text="hi"), SamplingParams(max_tokens=2))
            return codes, refused.value
        finally:
            await server.stop(0)

    codes, refused = asyncio.run(go())
    assert codes == {"right": grpc.StatusCode.OK, "wrong": grpc.StatusCode.UNAUTHENTICATED,
                     "missing": grpc.StatusCode.UNAUTHENTICATED}
    assert refused.code() is grpc.StatusCode.UNAUTHENTICATED and "wrong bearer token" in refused.details()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls_switch_serves_tls_only(tmp_path):
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    access = load_access(Router(tls_cert_file=str(cert), tls_key_file=str(key)))

    async def go():
        server, address = await serve(access)
        try:
            async with Client(address, timeout_s=5, tls_root_certs=cert.read_bytes()) as client:
                over_tls = await health_code(client)
            async with Client(address, timeout_s=5) as client:
                plain = await health_code(client)
            return over_tls, plain
        finally:
            await server.stop(0)

    over_tls, plain = asyncio.run(go())
    assert over_tls is grpc.StatusCode.OK
    assert plain is grpc.StatusCode.UNAVAILABLE  # a plain-text client cannot talk to the TLS port


def test_unreadable_or_empty_files_name_their_field(tmp_path):
    empty = tmp_path / "token"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="router.token_file"):
        load_access(Router(token_file=str(empty)))
    with pytest.raises(ConfigError, match="router.tls_cert_file: cannot read"):
        load_access(Router(tls_cert_file=str(tmp_path / "missing.crt"), tls_key_file=str(tmp_path / "k")))
