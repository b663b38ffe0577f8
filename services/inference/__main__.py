from services.core.server import run
from services.inference.app import build

run("inference", build)
