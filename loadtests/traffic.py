"""The images a load test sends, and how often each kind.

A traffic file (JSON) lists images with their category and whether the part is
defective; the load generators draw from it with a configurable share of
defective parts (the line's defect rate), categories equally often. The
images are ones the models did not train on: the synthetic surfaces are
generated afresh with their own seed, ELPV cells come from its test split.

    python -m loadtests.traffic --registry registry --out .inspectray/traffic

Every drawn image gets four random bytes after its data (decoders ignore
them), so that no two requests share an image hash and no answer comes from
the result cache: a camera never sends the same frame twice.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

TRAFFIC_ENV = "INSPECTRAY_TRAFFIC"
DEFECTIVE_SHARE_ENV = "INSPECTRAY_DEFECTIVE_SHARE"
# Read by the Locust users (loadtests/locustfile.py), which import gevent's monkey
# patching: anything else takes these names from here, never from the locustfile.
REQUEST_LOG_ENV = "INSPECTRAY_REQUEST_LOG"
USER_RPS_ENV = "INSPECTRAY_USER_RPS"
DEFAULT_DEFECTIVE_SHARE = 0.1


class TrafficError(ValueError):
    """A traffic file or mix that cannot be used (says why)."""


@dataclass(frozen=True)
class TrafficImage:
    """One image to send: its file, its category, and the ground truth."""

    path: str
    category: str
    defective: bool

    @property
    def label(self) -> str:
        """``defective`` or ``good``."""
        return "defective" if self.defective else "good"


@dataclass(frozen=True)
class Draw:
    """One request's image: what it is, and the bytes to send."""

    image: TrafficImage
    body: bytes

    def fields(self) -> dict[str, Any]:
        """What a request's record keeps of the image: its file, category, ground truth."""
        return {
            "image": self.image.path,
            "category": self.image.category,
            "defective": self.image.defective,
        }


class Traffic:
    """A pool of images and the mix to draw from it.

    Args:
        images: the pool (every category needs good images; defective ones are
            drawn when ``defective_share`` > 0).
        defective_share: the share of requests that carry a defective part.

    Raises:
        TrafficError: an empty pool, a share outside [0, 1], or a category
            without the images its share needs.
    """

    def __init__(self, images: Sequence[TrafficImage], defective_share: float) -> None:
        if not 0.0 <= defective_share <= 1.0:
            raise TrafficError(f"the defective share must be in [0, 1], not {defective_share}")
        if not images:
            raise TrafficError("the traffic has no images")
        self.defective_share = defective_share
        self.categories = sorted({image.category for image in images})
        self._pools: dict[tuple[str, bool], list[TrafficImage]] = {}
        for image in images:
            self._pools.setdefault((image.category, image.defective), []).append(image)
        for category in self.categories:
            for defective, share in ((False, 1.0 - defective_share), (True, defective_share)):
                if share > 0 and not self._pools.get((category, defective)):
                    kind = "defective" if defective else "good"
                    raise TrafficError(f"the traffic has no {kind} image of {category}")
        self._bytes: dict[str, bytes] = {}

    @classmethod
    def from_file(cls, path: Path | str, defective_share: float | None = None) -> Traffic:
        """Read a traffic file (see :func:`write_traffic`)."""
        try:
            data = json.loads(Path(path).read_text())
            images = [TrafficImage(**item) for item in data["images"]]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise TrafficError(f"cannot read the traffic file {path}: {error}") from error
        share = data.get("defective_share", DEFAULT_DEFECTIVE_SHARE)
        return cls(images, share if defective_share is None else defective_share)

    @classmethod
    def from_env(cls) -> Traffic:
        """The traffic named by ``INSPECTRAY_TRAFFIC`` (share: ``INSPECTRAY_DEFECTIVE_SHARE``)."""
        path = os.environ.get(TRAFFIC_ENV)
        if not path:
            raise TrafficError(
                f"set {TRAFFIC_ENV} to a traffic file (python -m loadtests.traffic --help)"
            )
        share = os.environ.get(DEFECTIVE_SHARE_ENV)
        return cls.from_file(path, float(share) if share else None)

    def data(self, image: TrafficImage) -> bytes:
        """The image file's bytes (read once)."""
        if image.path not in self._bytes:
            self._bytes[image.path] = Path(image.path).read_bytes()
        return self._bytes[image.path]

    def draw(self, rng: random.Random) -> Draw:
        """A category at random, defective with the set share, then an image of that kind."""
        category = rng.choice(self.categories)
        defective = rng.random() < self.defective_share
        image = rng.choice(self._pools[category, defective])
        return Draw(image, self.data(image) + rng.randbytes(4))


def multipart(fields: Mapping[str, str], image: bytes, filename: str = "part.png") -> tuple:
    """A ``multipart/form-data`` body with the ``image`` file and text fields.

    Returns:
        ``(body bytes, content-type header)``.
    """
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
        f'filename="{filename}"\r\nContent-Type: image/png\r\n\r\n'.encode()
        + image
        + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


SYNTHETIC = "synthetic"
ELPV = "elpv"


def build_traffic(
    categories: Sequence[str],
    out_dir: Path,
    images_per_class: int = 8,
    image_size: int = 256,
    seed: int = 20261124,
) -> list[TrafficImage]:
    """Images of the given categories the models have not seen.

    Synthetic surfaces are generated into ``out_dir/synthetic`` (reused when
    there); ELPV module types take ELPV's test split. Other categories have no
    image source here and are left out.

    Raises:
        TrafficError: none of the categories has an image source.
    """
    from models.data import load_dataset
    from models.data.elpv import load_elpv
    from models.data.synthetic import SURFACES, generate

    images: list[TrafficImage] = []
    surfaces = [c for c in categories if c in SURFACES]
    if surfaces:
        root = out_dir / SYNTHETIC
        manifest = root / "manifest.json"
        wanted = {"surfaces": sorted(surfaces), "size": image_size, "seed": seed}
        stamp = out_dir / "synthetic.json"
        if not manifest.is_file() or not stamp.is_file() or json.loads(stamp.read_text()) != wanted:
            generate(
                root,
                images_per_class=images_per_class,
                seed=seed,
                size=image_size,
                surfaces=sorted(surfaces),
                overwrite=True,
            )
            stamp.write_text(json.dumps(wanted))
        dataset = load_dataset(SYNTHETIC, root)
        images += [
            TrafficImage(str(s.image_path), s.category, s.is_anomalous) for s in dataset.samples
        ]
    elpv_types = [c for c in categories if c.startswith("solar_cell")]
    if elpv_types:
        dataset = load_elpv()
        for category in elpv_types:
            images += [
                TrafficImage(str(s.image_path), s.category, s.is_anomalous)
                for s in dataset.select(category, "test")
            ]
    if not images:
        raise TrafficError(
            f"no image source for the categories {list(categories)}: the load tests send "
            "synthetic surfaces and ELPV module types"
        )
    return images


def write_traffic(
    images: Sequence[TrafficImage], path: Path, defective_share: float = DEFAULT_DEFECTIVE_SHARE
) -> Path:
    """Write a traffic file; checks the mix can be drawn first."""
    Traffic(images, defective_share)
    path.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {
        "defective_share": defective_share,
        "images": [asdict(image) for image in images],
    }
    path.write_text(json.dumps(data, indent=1))
    return path


def served_categories(registry_uri: str) -> list[str]:
    """The categories a registry serves (those with a detector)."""
    from models.artifacts import ArtifactRegistry
    from models.inspection import load_plan

    return sorted(load_plan(ArtifactRegistry(registry_uri)).categories)


def main(argv: Sequence[str] | None = None) -> int:
    """Write a traffic file for the categories a registry serves."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--registry", required=True, help="registry folder or URL")
    parser.add_argument("--out", required=True, help="folder for the images and traffic.json")
    parser.add_argument("--images-per-class", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--defective-share", type=float, default=DEFAULT_DEFECTIVE_SHARE)
    args = parser.parse_args(argv)
    out = Path(args.out)
    images = build_traffic(
        served_categories(args.registry), out, args.images_per_class, args.image_size
    )
    path = write_traffic(images, out / "traffic.json", args.defective_share)
    print(json.dumps({"traffic": str(path), "images": len(images)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
