"""Suite-wide settings: asyncio tests run on one event loop per test."""

import os

# Tests never read a developer's own PARLEY_* settings.
for _name in [n for n in os.environ if n.startswith("PARLEY_")]:
    del os.environ[_name]
