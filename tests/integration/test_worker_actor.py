"""The worker actor under a real (local) Ray: an actor whose engine thread died exits, so that the pool and the
routers see a crashed worker (replaced, its requests resumed elsewhere) instead of one that answers and serves
nothing. A sim engine (Llama-3-8B on a modelled H100): no weights to load."""

import time

import pytest
import ray

from pdserve.engine import EngineConfig
from pdserve.registry.entries import Role
from pdserve.worker.runtime import WorkerSpec
from pdserve.worker_actor import Worker

CONFIG = EngineConfig(backend="sim", model="llama-3-8b", num_kv_blocks=64, num_threads=1)
START_TIMEOUT_S = 180
EXIT_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def local_ray():
    # a local Ray of its own ("local"), even while a cluster of another test runs its head on this machine
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _break_engine_thread(worker: Worker) -> None:
    """Runs inside the actor: the next step's callback raises, as a bug in a role's code would."""
    def fail(engine, outputs):
        raise RuntimeError("injected failure")

    worker.front.runtime.thread.attach(fail, None)


def test_an_actor_whose_engine_thread_died_exits(local_ray):
    actor = ray.remote(Worker).options(max_concurrency=100).remote(WorkerSpec("decode-0", Role.DECODE, CONFIG))
    assert ray.get(actor.start.remote(), timeout=START_TIMEOUT_S).worker_id == "decode-0"
    assert ray.get(actor.info.remote(), timeout=EXIT_TIMEOUT_S).worker_id == "decode-0"
    ray.get(actor.__ray_call__.remote(_break_engine_thread), timeout=EXIT_TIMEOUT_S)
    deadline = time.monotonic() + EXIT_TIMEOUT_S
    with pytest.raises(ray.exceptions.RayActorError):
        while time.monotonic() < deadline:
            ray.get(actor.info.remote(), timeout=EXIT_TIMEOUT_S)
            time.sleep(0.1)
    with pytest.raises(ray.exceptions.RayActorError):  # and it stays gone
        ray.get(actor.events.remote("router-a", 0.1), timeout=EXIT_TIMEOUT_S)
