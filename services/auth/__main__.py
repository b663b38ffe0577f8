from services.auth.app import build
from services.core.server import run

run("auth", build)
