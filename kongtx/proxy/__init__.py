"""The proxy site: the gateway resource, the upstream HTTP/1.1 client pool,
the balancer and health checks."""
