"""Running a cluster: the worker registry in Redis, a local redis-server, the engine thread the workers share, and
the supervisor that starts Ray, the workers and the router (`pdserve up`)."""
