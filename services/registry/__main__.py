"""`python -m services.registry`: the model registry agent."""

from common.agent import run
from services.registry.service import build

if __name__ == "__main__":
    run(build)
