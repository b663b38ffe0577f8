from services.cache.app import build
from services.core.server import run

run("cache", build)
