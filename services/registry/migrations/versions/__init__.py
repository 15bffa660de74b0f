"""Revisions of the registry database, oldest first."""
