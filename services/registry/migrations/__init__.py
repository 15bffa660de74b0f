"""Alembic migrations of the registry database (see env.py)."""
