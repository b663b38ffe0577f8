"""The app as an installable PWA served by the gateway: its files with the right types and headers,
the manifest and icons, and a service worker that keeps the app shell but never the API."""

from __future__ import annotations

import httpx
import pytest

from services.gateway import web_app


@pytest.mark.parametrize("path", ["/", *(f"/{name}" for name in web_app.files())])
def test_gateway_serves_every_file_of_the_app_with_its_type(web_url: str, path: str) -> None:
    answer = httpx.get(f"{web_url}{path}")
    name = "index.html" if path == "/" else path[1:]
    assert answer.status_code == 200
    assert answer.content == (web_app.SOURCE / name).read_bytes()
    assert answer.headers["content-type"] == web_app.CONTENT_TYPES["." + name.rsplit(".", 1)[1]]
    assert answer.headers["x-content-type-options"] == "nosniff"
    if name.endswith(".html"):
        assert "script-src 'self'" in answer.headers["content-security-policy"]


def test_the_api_beside_the_app_still_answers_json(web_url: str) -> None:
    assert httpx.get(f"{web_url}/healthz").json() == {"status": "SERVING"}
    missing = httpx.get(f"{web_url}/no-such-page")
    assert missing.status_code == 404 and missing.headers["content-type"] == "application/json"
    assert httpx.get(f"{web_url}/v1/models").status_code == 401
    # A query string (as the manifest's start_url may carry) still gets the app.
    assert httpx.get(f"{web_url}/?source=pwa").status_code == 200


def test_manifest_and_icons_make_it_installable(new_page) -> None:
    page = new_page()
    href = page.locator('link[rel="manifest"]').get_attribute("href")
    manifest = page.evaluate(f"fetch('{href}').then((r) => r.json())")
    assert manifest["name"] == "Parley" and manifest["display"] == "standalone"
    assert manifest["start_url"] == "/" and manifest["scope"] == "/"
    sizes = {icon["sizes"] for icon in manifest["icons"] if icon["type"] == "image/png"}
    assert {"192x192", "512x512"} <= sizes
    for icon in manifest["icons"]:
        if icon["type"] == "image/png":
            width, height = page.evaluate(
                """async (src) => { const b = await createImageBitmap(await (await fetch(src)).blob());
                   return [b.width, b.height]; }""", icon["src"])
            assert f"{width}x{height}" == icon["sizes"]


def test_service_worker_caches_the_shell_and_opens_offline_but_never_caches_the_api(signed_in) -> None:
    page = signed_in()
    scope = page.evaluate("navigator.serviceWorker.ready.then((r) => r.scope)")
    assert scope.endswith("/")
    page.wait_for_function("() => navigator.serviceWorker.controller !== null", timeout=15_000)
    page.get_by_role("button", name="New chat").first.click()
    page.get_by_label("Message", exact=True).wait_for()
    cached = page.evaluate("""async () => {
        const urls = [];
        for (const name of await caches.keys()) {
          for (const request of await (await caches.open(name)).keys()) urls.push(new URL(request.url).pathname);
        }
        return urls; }""")
    assert {"/", "/app.js", "/style.css", "/manifest.webmanifest"} <= set(cached)
    assert not [url for url in cached if url.startswith("/v1/") or url == "/healthz"]

    # Offline, the app still opens (from the cache) and says what is wrong in plain words.
    page.context.set_offline(True)
    page.reload()
    page.get_by_role("link", name="Parley").wait_for()
    # Debian's Chromium 150 hands the reloaded document navigator.onLine === true although the network
    # is still emulated offline; setting the emulation again reaches the new document (and fires the
    # `offline` event a real network loss fires).
    page.context.set_offline(False)
    page.context.set_offline(True)
    page.get_by_text("You are offline").first.wait_for()
    page.context.set_offline(False)
