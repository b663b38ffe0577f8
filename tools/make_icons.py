"""Draws the web app's PNG icons (web/icon-*.png) with the standard library only: the same picture
as web/icon.svg — a white speech bubble with three dots on a blue rounded square. The PNGs are
committed; run this after changing the design:  python tools/make_icons.py
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

WEB = Path(__file__).resolve().parents[1] / "web"
BLUE = (29, 78, 216)
WHITE = (255, 255, 255)
SAMPLES = 4  # per axis: 16 samples per pixel smooth the edges


def _rounded_rect(x: float, y: float, left: float, top: float, right: float, bottom: float, radius: float) -> bool:
    if not (left <= x <= right and top <= y <= bottom):
        return False
    cx = min(max(x, left + radius), right - radius)
    cy = min(max(y, top + radius), bottom - radius)
    return (x - cx) ** 2 + (y - cy) ** 2 <= radius**2


def _in_triangle(x: float, y: float, a: tuple[float, float], b: tuple[float, float], c: tuple[float, float]) -> bool:
    def side(p: tuple[float, float], q: tuple[float, float]) -> float:
        return (x - q[0]) * (p[1] - q[1]) - (p[0] - q[0]) * (y - q[1])

    d1, d2, d3 = side(a, b), side(b, c), side(c, a)
    return not ((d1 < 0 or d2 < 0 or d3 < 0) and (d1 > 0 or d2 > 0 or d3 > 0))


def _colour(u: float, v: float, maskable: bool) -> tuple[tuple[int, int, int], float]:
    """Colour and opacity at (u, v) in the unit square."""
    if maskable:
        # Full-bleed background; the picture stays inside the 80% safe zone.
        background = True
        u, v = (u - 0.5) / 0.8 + 0.5, (v - 0.5) / 0.8 + 0.5
    else:
        background = _rounded_rect(u, v, 0, 0, 1, 1, 0.22)
    if not background:
        return BLUE, 0.0
    bubble = _rounded_rect(u, v, 0.18, 0.22, 0.82, 0.68, 0.12) or _in_triangle(u, v, (0.3, 0.64), (0.44, 0.64), (0.26, 0.82))
    if bubble:
        for dot_x in (0.36, 0.5, 0.64):
            if (u - dot_x) ** 2 + (v - 0.45) ** 2 <= 0.045**2:
                return BLUE, 1.0
        return WHITE, 1.0
    return BLUE, 1.0


def draw(size: int, maskable: bool = False) -> bytes:
    rows = []
    for py in range(size):
        row = bytearray([0])  # PNG filter type: none
        for px in range(size):
            r = g = b = a = 0.0
            for sy in range(SAMPLES):
                for sx in range(SAMPLES):
                    u = (px + (sx + 0.5) / SAMPLES) / size
                    v = (py + (sy + 0.5) / SAMPLES) / size
                    (cr, cg, cb), ca = _colour(u, v, maskable)
                    r, g, b, a = r + cr * ca, g + cg * ca, b + cb * ca, a + ca
            n = SAMPLES * SAMPLES
            if a:
                row += bytes((round(r / a), round(g / a), round(b / a), round(255 * a / n)))
            else:
                row += bytes(4)
        rows.append(bytes(row))
    return _png(size, size, b"".join(rows))


def _png(width: int, height: int, raw: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)  # 8-bit RGBA
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def main() -> None:
    for name, size, maskable in (("icon-192.png", 192, False), ("icon-512.png", 512, False), ("icon-maskable-512.png", 512, True)):
        (WEB / name).write_bytes(draw(size, maskable))
        print(f"wrote web/{name}")


if __name__ == "__main__":
    main()
