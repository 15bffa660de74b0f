"""`python -m services.alerts`: the alerts agent (settings: `services.alerts.settings`)."""

from common.agent import run
from services.alerts.service import build

if __name__ == "__main__":
    run(build)
