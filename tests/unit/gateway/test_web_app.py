"""The web app's files and the gateway routes that serve them, checked without a browser: every file
is routed with its type, the service worker's shell names real files and never the API, the
manifest's icons exist at their stated sizes, and no script builds HTML from strings."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest

from services.core import config
from services.gateway import envoy_config, web_app

WEB = web_app.SOURCE


def web_routes(env: dict[str, str]) -> list[dict]:
    built = envoy_config.build(config.load(envoy_config.GatewaySettings, env), config.load(config.CommonSettings, env))
    hcm = built["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["route_config"]["max_direct_response_body_size_bytes"] >= max(p.stat().st_size for p in WEB.iterdir())
    return [r for r in hcm["route_config"]["virtual_hosts"][0]["routes"] if r.get("name", "").startswith("web:")]


def test_every_file_is_served_from_web_dir_with_its_content_type_and_the_transcoder_off() -> None:
    routes = {r["match"]["path"]: r for r in web_routes({"PARLEY_WEB_DIR": "/etc/parley/web"})}
    assert set(routes) == {"/", *(f"/{name}" for name in web_app.files())}
    assert routes["/"]["direct_response"]["body"]["filename"] == "/etc/parley/web/index.html"
    for path, route in routes.items():
        headers = {h["header"]["key"]: h["header"]["value"] for h in route["response_headers_to_add"]}
        name = "index.html" if path == "/" else path[1:]
        assert headers["content-type"] == web_app.CONTENT_TYPES[Path(name).suffix]
        assert route["typed_per_filter_config"]["envoy.filters.http.grpc_json_transcoder"]["disabled"] is True
    assert "content-security-policy" in {h["header"]["key"] for h in routes["/"]["response_headers_to_add"]}


def test_a_file_without_a_known_type_is_refused(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<!doctype html>")
    (tmp_path / "notes.txt").write_text("secret plans")
    with pytest.raises(ValueError, match="notes.txt"):
        web_app.routes(tmp_path, source=tmp_path)


def test_service_worker_shell_lists_existing_files_and_never_the_api() -> None:
    sw = (WEB / "sw.js").read_text()
    shell = re.search(r"const SHELL = \[(.*?)\];", sw, re.S)
    assert shell
    paths = re.findall(r'"(/[^"]*)"', shell.group(1))
    assert "/" in paths and "/app.js" in paths
    for path in paths:
        assert path == "/" or (WEB / path[1:]).is_file(), path
    # Every module the app imports is in the shell, or the app would not start offline.
    for script in WEB.glob("*.js"):
        for module in re.findall(r'from "\./([\w.-]+)"', script.read_text()):
            assert f"/{module}" in paths, f"{script.name} imports {module}, missing from sw.js SHELL"
    assert 'startsWith("/v1/")' in sw


def test_manifest_icons_exist_at_their_sizes() -> None:
    manifest = json.loads((WEB / "manifest.webmanifest").read_text())
    assert manifest["display"] == "standalone" and manifest["start_url"] == "/"
    for icon in manifest["icons"]:
        path = WEB / icon["src"].lstrip("/")
        assert path.is_file(), icon["src"]
        if icon["type"] == "image/png":
            data = path.read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n"
            width, height = struct.unpack(">II", data[16:24])
            assert icon["sizes"] == f"{width}x{height}"


def test_scripts_never_build_html_from_strings() -> None:
    sinks = re.compile(r"\.(innerHTML|outerHTML)\s*=|insertAdjacentHTML|document\.write|\beval\(|new Function\(")
    for script in WEB.glob("*.js"):
        assert not sinks.search(script.read_text()), f"{script.name} uses an HTML/code sink"
    assert "<script type=\"module\" src=\"/app.js\"></script>" in (WEB / "index.html").read_text()
    assert "style=" not in (WEB / "index.html").read_text()  # the CSP allows no inline style


def test_the_app_fits_a_configmap() -> None:
    # The `gateway-web` ConfigMap (k8s/base/gateway) is limited to 1 MiB, and `kubectl apply` keeps a
    # copy in an annotation limited to 256 KiB.
    total = sum(p.stat().st_size for p in WEB.iterdir() if p.is_file())
    assert total < 160 * 1024, f"web/ is {total} bytes"
