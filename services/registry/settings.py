"""The registry agent's own settings, from its environment (the agent's `env:` in the config).

- `GRAFTMESH_REGISTRY_DB_URL`: the metadata database, e.g.
  `postgresql+psycopg://user@host:5432/registry`; unset: SQLite at
  `<run_dir>/registry/registry.db`.
- `GRAFTMESH_REGISTRY_MAX_FILE_BYTES`: the largest artifact file accepted
  (default 16 GiB); a larger declared file is RESOURCE_EXHAUSTED.

Artifacts always live under `<run_dir>/registry/artifacts`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.errors import ConfigError
from services.registry.database import default_database_url

__all__ = ["RegistrySettings"]

DB_URL_ENV = "GRAFTMESH_REGISTRY_DB_URL"
MAX_FILE_BYTES_ENV = "GRAFTMESH_REGISTRY_MAX_FILE_BYTES"


class RegistrySettings(BaseModel):
    """Where the registry keeps its data and what it accepts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_dir: Path
    database_url: str | None = None
    max_file_bytes: int = Field(default=16 * 1024**3, gt=0)

    @classmethod
    def from_environ(
        cls, run_dir: Path, environ: Mapping[str, str] | None = None
    ) -> RegistrySettings:
        """Settings from the environment; `ConfigError` names a bad variable."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {"run_dir": run_dir}
        if env.get(DB_URL_ENV):
            values["database_url"] = env[DB_URL_ENV]
        if env.get(MAX_FILE_BYTES_ENV):
            values["max_file_bytes"] = env[MAX_FILE_BYTES_ENV]
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            names = {"database_url": DB_URL_ENV, "max_file_bytes": MAX_FILE_BYTES_ENV}
            raise ConfigError(
                [
                    f"{names.get(str(err['loc'][0]), err['loc'][0])}: {err['msg']}"
                    for err in exc.errors()
                ]
            ) from None

    @property
    def registry_dir(self) -> Path:
        """`<run_dir>/registry`."""
        return self.run_dir / "registry"

    @property
    def artifacts_dir(self) -> Path:
        """`<run_dir>/registry/artifacts`."""
        return self.registry_dir / "artifacts"

    def resolved_database_url(self) -> str:
        """The configured database URL, else the SQLite file under the run dir."""
        return self.database_url or default_database_url(self.run_dir)
