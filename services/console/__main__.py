"""`python -m services.console`: the web console agent (settings: `services.console.settings`)."""

from common.agent import run
from services.console.service import build

if __name__ == "__main__":
    run(build)
