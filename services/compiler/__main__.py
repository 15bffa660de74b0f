"""`python -m services.compiler`: the compiler agent (see `services/compiler/service.py`)."""

from common.agent import run
from services.compiler.service import build

if __name__ == "__main__":
    run(build)
