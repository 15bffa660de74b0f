"""The startup supervisor and the `graftmesh` CLI."""

import os

# The supervisor forks only to exec agents at once; gRPC's fork handlers are not
# needed and would log a warning for every child started while gRPC threads run.
# It must be set before grpc is imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
