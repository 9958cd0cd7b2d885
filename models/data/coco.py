"""COCO detection JSON, and the synthetic generator's output (which is COCO).

Layout::

    ROOT/annotations/*.json   one file per split; the split is the one of
                              ``train``, ``val``, ``test`` in the file name
    ROOT/images/...           ``file_name`` is relative to here (or to ROOT)
    ROOT/masks/...            ``mask_file`` (optional, per image) is relative to here

Each image is one :class:`Sample`. Besides standard COCO, an image entry may carry
``product_category`` (the sample's category; default: ROOT's folder name),
``defect_type`` (the label; default: ``good`` without annotations, else the most
frequent annotation category) and ``mask_file``.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from models.data.dataset import Dataset, dataset_folder
from models.data.sample import GOOD, SPLITS, Box, DataError, Sample
from models.data.splits import split_off_val

SYNTHETIC_GENERATOR = "inspectray-synthetic"
SYNTHETIC_FORMAT_VERSION = 1

# What a JSON field must be, as (accepted types, name used in errors). bool is an
# int subclass in Python; a JSON true is never a valid id or coordinate.
_KINDS: dict[str, tuple[tuple[type, ...], str]] = {
    "int": ((int,), "an integer"),
    "number": ((int, float), "a number"),
    "str": ((str,), "a string"),
    "list": ((list,), "a list"),
    "dict": ((dict,), "an object"),
}


def read_json(path: Path) -> dict[str, Any]:
    """Parse a JSON file whose top level is an object.

    Raises:
        DataError: the file is missing, not JSON, or not an object (named).
    """
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(payload, dict):
        raise DataError(f"{path}: top level must be a JSON object, got {type(payload).__name__}")
    return payload


def json_field(
    entry: dict[str, Any], key: str, kind: str, path: Path, where: str = "", optional: bool = False
) -> Any:
    """One field of a JSON object, checked for presence and type.

    Args:
        entry: the object holding the field.
        key: field name.
        kind: ``"int"``, ``"number"``, ``"str"``, ``"list"`` or ``"dict"``.
        path: the JSON file (named in errors).
        where: which object this is, e.g. ``"images[3]"`` (named in errors).
        optional: return None when the key is absent instead of failing.

    Raises:
        DataError: the key is missing or has the wrong type; names file and key.
    """
    types, description = _KINDS[kind]
    name = f"{where}.{key}" if where else key
    if not isinstance(entry, dict):
        raise DataError(f"{path}: {where or 'entry'} must be a JSON object")
    if key not in entry:
        if optional:
            return None
        raise DataError(f"{path}: missing key {name!r}")
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, types):
        raise DataError(f"{path}: key {name!r} must be {description}, got {value!r}")
    return value


def json_numbers(
    entry: dict[str, Any], key: str, count: int, path: Path, where: str
) -> list[float]:
    """A field that must be a list of exactly ``count`` numbers (a bbox).

    Raises:
        DataError: missing, not a list, wrong length or a non-number; names file and key.
    """
    values = json_field(entry, key, "list", path, where)
    if len(values) != count or any(
        isinstance(v, bool) or not isinstance(v, int | float) for v in values
    ):
        raise DataError(f"{path}: key '{where}.{key}' must be {count} numbers, got {values!r}")
    return [float(v) for v in values]


def split_of(path: Path) -> str:
    """The split a COCO annotation file holds, from its name (``instances_val.json``).

    Raises:
        DataError: the name contains none, or more than one, of the split names.
    """
    found = [split for split in SPLITS if split in path.stem.lower()]
    if len(found) != 1:
        raise DataError(
            f"cannot tell the split of {path}: its name must contain exactly one of "
            f"{', '.join(SPLITS)} (found {found or 'none'})"
        )
    return found[0]


def _image_label(defect_type: str | None, annotations: list[tuple[str, float]]) -> str:
    """The sample label: explicit ``defect_type``, else good, else the dominant category.

    The dominant category is the most frequent one; ties go to the larger total
    area, then to the alphabetically first name.
    """
    if defect_type is not None:
        return defect_type
    if not annotations:
        return GOOD
    counts: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    for name, area in annotations:
        counts[name] += 1
        areas[name] += area
    return min(counts, key=lambda name: (-counts[name], -areas[name], name))


def _resolve_image(root: Path, file_name: str) -> Path:
    in_images = root / "images" / file_name
    if in_images.is_file():
        return in_images
    in_root = root / file_name
    return in_root if in_root.is_file() else in_images


def _sample_id(root: Path, image_path: Path) -> str:
    # The file's place under ROOT is unique (one file is one image) and does not
    # change when val is carved out of train; an absolute file_name is its own id.
    try:
        return image_path.relative_to(root).as_posix()
    except ValueError:
        return image_path.as_posix()


def read_categories(payload: dict[str, Any], path: Path) -> dict[int, str]:
    """Category id → name from a COCO payload's ``categories`` (errors name ``path``)."""
    categories: dict[int, str] = {}
    for i, entry in enumerate(json_field(payload, "categories", "list", path)):
        where = f"categories[{i}]"
        categories[json_field(entry, "id", "int", path, where)] = json_field(
            entry, "name", "str", path, where
        )
    return categories


def _read_split(root: Path, path: Path, split: str, default_category: str) -> list[Sample]:
    """Samples of one COCO annotation file."""
    payload = read_json(path)
    categories = read_categories(payload, path)

    images: dict[int, dict[str, Any]] = {}
    for i, entry in enumerate(json_field(payload, "images", "list", path)):
        where = f"images[{i}]"
        image_id = json_field(entry, "id", "int", path, where)
        if image_id in images:
            raise DataError(f"{path}: duplicate image id {image_id} at {where}")
        images[image_id] = {
            "where": where,
            "file_name": json_field(entry, "file_name", "str", path, where),
            "category": json_field(entry, "product_category", "str", path, where, optional=True),
            "defect_type": json_field(entry, "defect_type", "str", path, where, optional=True),
            "mask_file": json_field(entry, "mask_file", "str", path, where, optional=True),
        }
    if not images:
        raise DataError(f"{path} lists no images")

    boxes: dict[int, list[tuple[Box, float]]] = defaultdict(list)
    for i, entry in enumerate(json_field(payload, "annotations", "list", path)):
        where = f"annotations[{i}]"
        image_id = json_field(entry, "image_id", "int", path, where)
        category_id = json_field(entry, "category_id", "int", path, where)
        bbox = json_numbers(entry, "bbox", 4, path, where)
        if image_id not in images:
            raise DataError(f"{path}: {where} refers to image_id {image_id}, which has no image")
        if category_id not in categories:
            raise DataError(f"{path}: {where} has unknown category_id {category_id}")
        if bbox[2] < 0 or bbox[3] < 0:
            raise DataError(f"{path}: {where}.bbox has a negative width or height: {bbox}")
        area = json_field(entry, "area", "number", path, where, optional=True)
        box = Box(label=categories[category_id], xywh=tuple(bbox))
        boxes[image_id].append((box, bbox[2] * bbox[3] if area is None else float(area)))

    samples = []
    for image_id, image in images.items():
        image_path = _resolve_image(root, image["file_name"])
        if not image_path.is_file():
            raise DataError(
                f"image file not found: {image_path} (referenced by {image['where']} of {path})"
            )
        mask_path = None
        if image["mask_file"] is not None:
            mask_path = root / "masks" / image["mask_file"]
            if not mask_path.is_file():
                raise DataError(
                    f"mask file not found: {mask_path} (referenced by {image['where']} of {path})"
                )
        annotated = boxes.get(image_id, [])
        samples.append(
            Sample(
                image_path=image_path,
                category=image["category"] or default_category,
                label=_image_label(
                    image["defect_type"], [(box.label, area) for box, area in annotated]
                ),
                split=split,
                mask_path=mask_path,
                boxes=tuple(box for box, _ in annotated),
                sample_id=_sample_id(root, image_path),
            )
        )
    return samples


def load_coco(root: Path | None, name: str = "coco") -> Dataset:
    """Load a COCO detection dataset (one annotation JSON per split).

    Without a val JSON, val is a stratified 10 % of train
    (:func:`models.data.splits.split_off_val`).

    Args:
        root: folder holding ``annotations/`` and ``images/``.
        name: the dataset's name (``"synthetic"`` reuses this loader).

    Raises:
        DataError: no root, a missing folder, file or key, a bad annotation, or an
            image listed in two annotation files; the message names the file.
    """
    root = dataset_folder(name, root)
    annotations = root / "annotations"
    files = sorted(annotations.glob("*.json")) if annotations.is_dir() else []
    if not files:
        raise DataError(f"no annotation files: expected {annotations}/*.json")

    samples: list[Sample] = []
    listed_in: dict[str, Path] = {}
    for path in files:
        for sample in _read_split(root, path, split_of(path), root.resolve().name):
            if sample.sample_id in listed_in:
                raise DataError(
                    f"image {sample.image_path} is listed in both {listed_in[sample.sample_id]} "
                    f"and {path}"
                )
            listed_in[sample.sample_id] = path
            samples.append(sample)
    if not any(s.split == "val" for s in samples):
        samples = split_off_val(samples)
    return Dataset(name, tuple(sorted(samples, key=lambda s: s.sample_id)))


def load_synthetic(root: Path | None) -> Dataset:
    """Load the output of ``inspectray data synth`` (its COCO half).

    Args:
        root: the generator's ``--out`` folder (holds ``manifest.json`` and ``coco/``).

    Raises:
        DataError: no root, no or a foreign manifest, or a surface of the manifest
            with no images; plus everything :func:`load_coco` raises.
    """
    hint = "generate it with `inspectray data synth --out OUT`"
    root = dataset_folder("synthetic", root, hint)
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise DataError(f"{root} is not a synthetic dataset: no {manifest_path}; {hint}")
    manifest = read_json(manifest_path)
    generator = manifest.get("generator")
    if generator != SYNTHETIC_GENERATOR:
        raise DataError(
            f"{manifest_path}: 'generator' is {generator!r}, not {SYNTHETIC_GENERATOR!r}; {hint}"
        )
    version = manifest.get("format_version")
    if version != SYNTHETIC_FORMAT_VERSION:
        raise DataError(
            f"{manifest_path}: 'format_version' is {version!r}, this loader reads "
            f"{SYNTHETIC_FORMAT_VERSION}; regenerate it ({hint})"
        )
    dataset = load_coco(root / "coco", name="synthetic")
    surfaces = json_field(manifest, "surfaces", "list", manifest_path)
    for surface in surfaces:
        if surface not in dataset.categories:
            raise DataError(
                f"category {surface!r} of {manifest_path} has no images in {root / 'coco'}"
            )
    return dataset
