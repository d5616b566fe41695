"""A router only tokenizes and routes: it starts without torch. Importing torch cost a restarted router ~1.5 s of its
~4 s start on this machine and ~190 MB (a router SIGKILLed under load came back in 10.6 s on a slow CI machine,
over the 10 s the failover test allows). Each check runs in a fresh interpreter, as a router does."""

import subprocess
import sys

import pytest

from pdserve.engine.model_source import resolve
from pdserve.engine.tokenizer import load_tokenizer, tokenizer_class

pytestmark = pytest.mark.model


def imports_torch(code: str) -> bool:
    run = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint('torch' in sys.modules)"],
                         capture_output=True, text=True, timeout=120, check=True)
    return run.stdout.strip().splitlines()[-1] == "True"


def test_the_router_its_tokenizer_and_the_worker_actor_class_import_no_torch(gguf_path):
    # Ray imports the actor's module in every process that looks a worker up by name: routers do
    assert not imports_torch("import pdserve.router.router_process, pdserve.router.main, pdserve.worker_actor")
    assert not imports_torch(f"from pdserve.engine.model_source import resolve\n"
                             f"from pdserve.engine.tokenizer import load_tokenizer\n"
                             f"load_tokenizer(resolve({gguf_path!r})).encode('hello')")
    assert imports_torch("from pdserve.worker_actor import role_front\nimport pdserve.decode_worker.worker")


def test_the_tokenizer_class_is_the_one_auto_tokenizer_picks_and_encodes_alike(gguf_path, tmp_path):
    from transformers import AutoTokenizer

    source = resolve(gguf_path)
    ours = load_tokenizer(source).hf
    folder = ours.name_or_path
    auto = AutoTokenizer.from_pretrained(folder)
    assert type(ours) is type(auto)
    text = "Tell me a short story about the number 7, in <b>bold</b> — s'il vous plaît."
    assert ours.encode(text) == auto.encode(text)
    assert tokenizer_class(str(tmp_path)) is AutoTokenizer  # no tokenizer_config.json: AutoTokenizer decides
