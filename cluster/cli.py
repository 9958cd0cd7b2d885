"""The ``inspectray`` command line.

Commands print JSON on stdout (machine-readable, pipe it to ``jq``) and progress
and errors on stderr. Errors in the user's input (a missing folder, a bad config
key, a truncated image) exit with status 2 and one clear line, not a traceback.

    inspectray weights check
    inspectray data synth --out DIR --images-per-class N --seed S [--size PX]
    inspectray data show --dataset NAME [--root DIR] [--verify]
    inspectray registry list | show CATEGORY STAGE [REF] | promote CATEGORY STAGE VERSION
    inspectray config show
    inspectray walkthrough
    inspectray train | tune | eval        (cluster/training_commands.py)
    inspectray serve | predict | keys     (cluster/serving_commands.py)
    inspectray dashboards                 (cluster/dashboards.py)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from cluster import dashboards, serving_commands, training_commands
from cluster.arguments import add_command as add
from cluster.arguments import dataset_choices, dataset_root, print_json, registry, settings

EXIT_USER_ERROR = 2

# The scikit-image sample photos used to check the ImageNet weights, and the
# classes the check requires (the rest are reported, not required).
CHECK_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
REQUIRED_CLASSES = {"chelsea": 285, "coffee": 967}  # Egyptian cat, espresso


# -- weights -----------------------------------------------------------------------


def weights_check() -> tuple[dict[str, int], list[str]]:
    """Classify scikit-image's bundled photos with the packaged ImageNet weights.

    Returns:
        ``({photo: imagenet_class}, [failures])``; failures name each required
        photo whose class is wrong.
    """
    from PIL import Image
    from skimage import data as photos

    from models.backbone import create_backbone, imagenet_top1

    model, preprocessing = create_backbone("efficientnet_lite0", pretrained=True)
    images = {name: Image.fromarray(getattr(photos, name)()) for name in CHECK_PHOTOS}
    top1 = imagenet_top1(model, preprocessing, images)
    failures = [
        f"{name}: got class {top1[name]}, expected {expected}"
        for name, expected in REQUIRED_CLASSES.items()
        if top1[name] != expected
    ]
    return top1, failures


def cmd_weights_check(args: argparse.Namespace) -> int:
    """Print each photo's top-1 ImageNet class; fail if a required one is wrong."""
    top1, failures = weights_check()
    print_json(top1)
    for failure in failures:
        print(f"error: pretrained weights check failed: {failure}", file=sys.stderr)
    return 1 if failures else 0


# -- data --------------------------------------------------------------------------


def cmd_data_synth(args: argparse.Namespace) -> int:
    """Generate the synthetic defect dataset."""
    from models.data.synthetic import generate, render_preview

    manifest = generate(
        Path(args.out),
        images_per_class=args.images_per_class,
        seed=args.seed,
        size=args.size,
        surfaces=args.surfaces,
        overwrite=args.overwrite,
        progress=True,
    )
    if args.preview:
        render_preview(Path(args.out), Path(args.preview))
        print(f"preview written to {args.preview}", file=sys.stderr)
    print_json(manifest)
    return 0


def cmd_data_show(args: argparse.Namespace) -> int:
    """Print per-category, per-split, per-label counts of a dataset."""
    from models.data import load_dataset
    from models.data.registry import verify_images

    dataset = load_dataset(args.dataset, dataset_root(args))
    if args.verify:
        checked = verify_images(dataset)
        print(f"verified {checked} image files: all decode", file=sys.stderr)
    print_json(dataset.summary())
    return 0


# -- registry ----------------------------------------------------------------------


def cmd_registry_list(args: argparse.Namespace) -> int:
    """List categories, stages, versions and aliases."""
    store = registry(args)
    listing = {
        category: {
            stage: {
                "versions": store.versions(category, stage),
                "aliases": store.aliases(category, stage),
            }
            for stage in store.stages(category)
        }
        for category in store.categories()
    }
    print_json({"registry": store.uri, "artifacts": listing})
    return 0


def cmd_registry_show(args: argparse.Namespace) -> int:
    """Print one artifact's manifest."""
    print_json(registry(args).manifest(args.category, args.stage, args.ref).model_dump())
    return 0


def cmd_registry_promote(args: argparse.Namespace) -> int:
    """Point an alias (default ``production``) at a version."""
    registry(args).promote(args.category, args.stage, args.version, args.alias)
    print_json({"category": args.category, "stage": args.stage, args.alias: args.version})
    return 0


# -- config ------------------------------------------------------------------------


def cmd_config_show(args: argparse.Namespace) -> int:
    """Print the effective configuration (file + environment + defaults)."""
    print_json(settings(args).model_dump(mode="json"))
    return 0


# -- walkthrough -------------------------------------------------------------------


def cmd_walkthrough(args: argparse.Namespace) -> int:
    """A short tour: weights, the real ELPV data, and a generated synthetic dataset."""
    from models.data import load_dataset
    from models.data.synthetic import generate, render_preview

    config = settings(args)

    def step(title: str) -> None:
        print(f"\n== {title}", file=sys.stderr)

    step("1/4 pretrained EfficientNet-Lite0 from its package: top-1 ImageNet class per photo")
    top1, failures = weights_check()
    print_json(top1)
    if failures:
        for failure in failures:
            print(f"error: {failure}", file=sys.stderr)
        return 1

    step("2/4 ELPV solar cells (real electroluminescence images, from the elpv-dataset package)")
    print_json(load_dataset("elpv").summary())

    out = config.data.root / "synthetic"
    step(f"3/4 synthetic industrial defects in {out}")
    if (out / "manifest.json").is_file():
        print(f"{out} already exists; reusing it (delete it to regenerate)", file=sys.stderr)
    else:
        generate(
            out,
            images_per_class=config.synth.images_per_class,
            seed=config.synth.seed,
            size=config.synth.size,
            progress=True,
        )
    preview = out / "preview.png"
    render_preview(out, preview)
    print_json(load_dataset("synthetic", out).summary())
    print(f"one image per defect type: {preview}", file=sys.stderr)

    step("4/4 configuration in effect")
    print_json(config.model_dump(mode="json"))
    print("\nNext: `make test` runs the test suite.", file=sys.stderr)
    return 0


# -- parser ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every command."""
    parser = argparse.ArgumentParser(prog="inspectray", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config file (default: $INSPECTRAY_CONFIG)")
    commands = parser.add_subparsers(dest="command", required=True)

    weights = commands.add_parser("weights", help="pretrained weights").add_subparsers(
        dest="action", required=True
    )
    add(weights, "check", cmd_weights_check)

    data = commands.add_parser("data", help="datasets").add_subparsers(dest="action", required=True)
    synth = add(data, "synth", cmd_data_synth)
    synth.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    synth.add_argument("--images-per-class", type=int, required=True, help="per surface and class")
    synth.add_argument("--seed", type=int, required=True)
    synth.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    synth.add_argument("--surfaces", nargs="+", help="product categories (default: all)")
    synth.add_argument("--overwrite", action="store_true", help="replace an existing output")
    synth.add_argument("--preview", help="also write a PNG with one image per defect type")
    show = add(data, "show", cmd_data_show)
    show.add_argument(
        "--dataset",
        required=True,
        choices=dataset_choices(),
    )
    show.add_argument("--root", help="dataset folder (ELPV: the installed package by default)")
    show.add_argument("--verify", action="store_true", help="decode every image to find bad files")

    artifacts = commands.add_parser("registry", help="trained artifacts").add_subparsers(
        dest="action", required=True
    )
    for name, func in (
        ("list", cmd_registry_list),
        ("show", cmd_registry_show),
        ("promote", cmd_registry_promote),
    ):
        command = add(artifacts, name, func)
        command.add_argument("--registry", help="registry folder or URL (default: config)")
        if name != "list":
            command.add_argument("category")
            command.add_argument("stage")
    artifacts.choices["show"].add_argument("ref", nargs="?", default="production")
    artifacts.choices["promote"].add_argument("version")
    artifacts.choices["promote"].add_argument("--alias", default="production")

    config = commands.add_parser("config", help="configuration").add_subparsers(
        dest="action", required=True
    )
    add(config, "show", cmd_config_show)
    add(commands, "walkthrough", cmd_walkthrough)

    training_commands.add_commands(commands)
    serving_commands.add_commands(commands)
    dashboards.add_commands(commands)
    return parser


# Where each kind of user error is defined. A command that never loaded one of these
# modules cannot have raised its error, so none is imported just to be caught:
# ``config show`` and ``--help`` answer without loading torch.
USER_ERRORS = (
    ("models.data.sample", "DataError"),
    ("models.config", "ConfigError"),
    ("models.artifacts", "ArtifactError"),
    ("models.backbone", "WeightsError"),
    ("models.descriptions", "DescriptionError"),
    ("cluster.local", "LocalClusterError"),
    ("cluster.redis_server", "RedisServerError"),
    ("cluster.dashboards", "DashboardError"),
)


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` is a mistake in the user's input (exit 2, one line)."""
    return any(
        module in sys.modules and isinstance(error, getattr(sys.modules[module], name))
        for module, name in USER_ERRORS
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; user errors exit 2 with a one-line message."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except Exception as error:
        if not is_user_error(error):
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
