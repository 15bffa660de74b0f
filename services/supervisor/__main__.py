"""`python -m services.supervisor ...` is the `graftmesh` command."""

from services.supervisor.cli import main

main()
