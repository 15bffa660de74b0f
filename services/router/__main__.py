"""`python -m services.router`: the inference router agent (settings: `ROUTER_CONFIG`)."""

from common.agent import run
from services.router.service import build

if __name__ == "__main__":
    run(build)
