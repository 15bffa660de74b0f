"""`python -m services.trainer`: the trainer agent (settings: `services/trainer/service.py`)."""

from common.agent import run
from services.trainer.service import build

if __name__ == "__main__":
    run(build)
