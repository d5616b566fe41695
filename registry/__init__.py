"""The cluster's shared state in Redis: the workers and routers that are up (each refreshing its own entry), the
control plane's address, the settings routers start from, and the streams of finished requests and controller
decisions. Every process of a cluster reads and writes it through `registry.Registry`; nothing here knows Ray,
gRPC or torch."""
