"""The drift drill: what a category's drift figures read for normal, darkened and blurred parts.

Runs the service's own router in this process (every stage in it, as the fused
topology does) over a registry, sends a category's test images as they are,
then darkened (a lamp at half or 30 % of its light) and blurred (a lens out of
focus), each condition with fresh windows, and prints the drift status each
leaves (``parts``, ``ks``, ``defective_share``, ``drifting``, ``reason``)::

    python -m loadtests.drift_drill --registry registry --dataset elpv --category solar_cell_mono
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
from collections.abc import Callable

from PIL import Image, ImageEnhance, ImageFilter

from deployments.imaging import encode_png
from deployments.router import RouterCore
from models.data import load_dataset, read_image

CONDITIONS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "normal": lambda image: image,
    "darkened to 50 %": lambda image: ImageEnhance.Brightness(image).enhance(0.5),
    "darkened to 30 %": lambda image: ImageEnhance.Brightness(image).enhance(0.3),
    "blurred (radius 3)": lambda image: image.filter(ImageFilter.GaussianBlur(3)),
}


def drill(registry: str, images: list[Image.Image], category: str) -> dict[str, dict]:
    """Each condition's drift status after all of ``images`` went through the router."""
    router = RouterCore({}, registry, None, "cpu")
    window = {"window": len(images), "min_parts": min(50, len(images))}
    router.reconfigure({"auth": "off", "cache_ttl_s": 0, "drift": window})
    found = {}
    for name, change in CONDITIONS.items():
        router.drift = router.fresh_drift_windows()  # fresh windows

        async def send(change: Callable[[Image.Image], Image.Image] = change) -> None:
            for image in images:
                await router.inspect_bytes(encode_png(change(image)), category)

        asyncio.run(send())
        found[name] = router.drift.status(category)
    return found


def main() -> None:
    """Print the drill's figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--root", help="dataset folder (ELPV: the installed package)")
    parser.add_argument("--category", required=True)
    parser.add_argument("--parts", type=int, default=120, help="test images per condition")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    test = list(load_dataset(args.dataset, args.root).select(args.category, "test"))
    random.Random(args.seed).shuffle(test)  # splits are grouped by label: draw a line's mix
    chosen = test[: args.parts]
    images = [read_image(s.image_path).convert("RGB") for s in chosen]
    figures = drill(args.registry, images, args.category)
    defective = sum(s.is_anomalous for s in chosen)
    print(json.dumps({"parts": len(chosen), "truly_defective": defective, **figures}, indent=1))


if __name__ == "__main__":
    main()
