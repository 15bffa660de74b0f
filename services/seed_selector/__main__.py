"""`python -m services.seed_selector`: the seed selector agent (settings: `service`)."""

from common.agent import run
from services.seed_selector.service import build

if __name__ == "__main__":
    run(build)
