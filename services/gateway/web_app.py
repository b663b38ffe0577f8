"""The PWA (web/) served by Envoy itself: one direct_response route per file, so the app shares the
API's origin (no CORS, cookies or second server) wherever the gateway runs.

The list of files comes from the repository's web/ folder; the bodies are read by Envoy at start
from `web_dir` (the same folder locally, the mounted `gateway-web` ConfigMap on Kubernetes). The
folder is flat because ConfigMap keys cannot hold a '/'. The transcoder is disabled on these routes:
with reject_unknown_method it would answer 404 for any path that no RPC binds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# What `make k8s-config` copies and what the routes list: the repository's web/ folder.
SOURCE = Path(__file__).resolve().parents[2] / "web"

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".webmanifest": "application/manifest+json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}

# Envoy's default limit for a direct_response body is 4 KiB.
MAX_BODY_BYTES = 1024 * 1024

# The app loads nothing from elsewhere and never needs inline script or style; model output is
# rendered as text, and this policy is the second line of defence should that ever slip.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; manifest-src 'self'; worker-src 'self'; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


def files(source: Path = SOURCE) -> list[str]:
    """The app's files, by name. A file of an unknown type is an error, never served as a guess."""
    names = sorted(p.name for p in source.iterdir() if p.is_file() and not p.name.startswith("."))
    unknown = [n for n in names if Path(n).suffix not in CONTENT_TYPES]
    if unknown:
        raise ValueError(f"web/: no content type for {', '.join(unknown)} (see services/gateway/web_app.py)")
    return names


def _headers(name: str) -> list[dict[str, Any]]:
    suffix = Path(name).suffix
    headers = {
        "content-type": CONTENT_TYPES[suffix],
        # Text files change with every release and have no hashed names: revalidate each time (the
        # service worker serves them offline). Icons rarely change.
        "cache-control": "public, max-age=86400" if suffix in (".png", ".svg") else "no-cache",
        "x-content-type-options": "nosniff",
        "referrer-policy": "no-referrer",
    }
    if suffix == ".html":
        headers["content-security-policy"] = CONTENT_SECURITY_POLICY
        headers["x-frame-options"] = "DENY"
    # Direct responses come with text/plain; these replace it.
    return [{"header": {"key": k, "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"} for k, v in headers.items()]


def routes(web_dir: Path, source: Path = SOURCE) -> list[dict[str, Any]]:
    """Routes for `/` (index.html) and `/<name>` for every file of the app."""
    disable_transcoder = {
        "envoy.filters.http.grpc_json_transcoder": {
            "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
            "disabled": True,
        }
    }
    paths = {f"/{name}": name for name in files(source)}
    if "index.html" in paths.values():
        paths["/"] = "index.html"
    return [
        {
            "name": f"web:{path}",
            "match": {"path": path},
            "direct_response": {"status": 200, "body": {"filename": str(web_dir / name)}},
            "response_headers_to_add": _headers(name),
            "typed_per_filter_config": disable_transcoder,
        }
        for path, name in sorted(paths.items())
    ]
