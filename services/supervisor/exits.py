"""The `graftmesh` exit codes: a public contract (README, ARCHITECTURE.md)."""

EXIT_OK = 0  # success, also `up` after a clean shutdown on SIGINT/SIGTERM
EXIT_FAILED = 1  # the command failed (e.g. no supervisor is running)
EXIT_CONFIG = 2  # invalid configuration or usage
EXIT_AGENT = 3  # a required agent failed to become healthy
EXIT_INFRA = 4  # NATS/Redis unavailable
