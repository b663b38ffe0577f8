from services.core.server import run
from services.session.app import build

run("session", build)
