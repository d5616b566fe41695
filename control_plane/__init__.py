"""The control plane: `pdserve up`'s process. It starts (or adopts) the cluster's redis-server and Ray head, the
worker actors and the router processes; keeps routers running (a router that exits is started again) and replaces
workers that die; runs the ratio controller; and serves Scale and Drain to the routers.

Layers: it sits on top of the worker side (it creates `worker_actor.Worker` actors) and beside the router, which it
runs as separate processes and never imports. Only the CLI is above it.
"""
