"""Small generated catalogues for the index and search-page tests: distinct colours and shapes per photo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def photo(i: int, size: tuple[int, int] = (96, 80)) -> Image.Image:
    """Photo i: its own background colour, with a coloured ellipse and bar at i-dependent places."""
    rng = np.random.default_rng(1000 + i)
    colour = lambda: tuple(int(v) for v in rng.integers(0, 256, 3))  # noqa: E731
    img = Image.new("RGB", size, colour())
    draw = ImageDraw.Draw(img)
    x, y = int(rng.integers(0, size[0] // 2)), int(rng.integers(0, size[1] // 2))
    draw.ellipse([x, y, x + size[0] // 2, y + size[1] // 2], fill=colour())
    draw.rectangle([0, size[1] - 12 - i % 20, size[0] // 3 + 3 * (i % 10), size[1] - 1], fill=colour())
    return img


def make_catalogue(root: Path, n: int = 12) -> Path:
    """n photos (JPEG, PNG, WebP; some in a subfolder), one undecodable .jpg and one unsupported .txt."""
    (root / "sub").mkdir(parents=True, exist_ok=True)
    suffixes = ["jpg", "png", "webp", "jpeg"]
    for i in range(n):
        folder = root / "sub" if i % 2 else root
        photo(i).save(folder / f"p{i:02d}.{suffixes[i % 4]}", quality=95) if suffixes[i % 4] in (
            "jpg",
            "jpeg",
        ) else photo(i).save(folder / f"p{i:02d}.{suffixes[i % 4]}")
    (root / "broken.jpg").write_bytes(b"this is not a JPEG")
    (root / "notes.txt").write_text("not a photo")
    return root
