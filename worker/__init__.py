"""The worker side: what every worker process runs, whatever its role. The engine on its own thread
(`engine_thread`), the runtime that holds it with a KV connector, a heartbeat into the registry and Prometheus
metrics (`runtime`, `heartbeat`, `metrics`), the KV pairs of a prefill worker with the decode workers (`kv_pairs`),
and the messages that cross between routers and workers (`messages`).

Layers: engine <- kv_transfer <- registry <- worker <- prefill_worker, decode_worker <- worker_actor. Nothing
here imports a role, the router or the control plane.
"""
