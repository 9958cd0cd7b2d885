"""The operator page (``GET /ui``) in a real browser against the running service.

Each page answer is checked against the answer ``POST /v1/inspect`` gives over
plain HTTP for the same image and options, so the page can neither invent nor
drop what the service said.
"""

from __future__ import annotations

import mimetypes
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"no browser: {CHROMIUM} is not installed", allow_module_level=True)

from playwright.sync_api import Browser, Page, sync_playwright  # noqa: E402

pytestmark = pytest.mark.slow

# The first answer of a fresh deployment may wait for models to load.
ANSWER_TIMEOUT_MS = 120_000
HTTP_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield browser
        browser.close()


@pytest.fixture()
def page(browser: Browser) -> Iterator[Page]:
    """A fresh page; uncaught script errors fail the test that raised them."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(ANSWER_TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, f"script errors on the page: {errors}"


@pytest.fixture(scope="module")
def categories(serving: Any) -> dict[str, Any]:
    response = requests.get(f"{serving.url}/v1/categories", timeout=HTTP_TIMEOUT_S)
    response.raise_for_status()
    return response.json()


def inspect_over_http(
    url: str, path: Path, category: str | None, *, explain: bool, boxes: bool
) -> requests.Response:
    """POST the file to /v1/inspect as the page does (multipart, "true"/"false" flags)."""
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    data = {"explain": str(explain).lower(), "boxes": str(boxes).lower()}
    if category is not None:
        data["category"] = category
    return requests.post(
        f"{url}/v1/inspect",
        files={"image": (path.name, path.read_bytes(), mime)},
        data=data,
        timeout=HTTP_TIMEOUT_S,
    )


def open_page(page: Page, url: str) -> None:
    page.goto(f"{url}/ui")
    # Ready once the categories came (the select is enabled) or an error is shown.
    page.wait_for_function(
        "() => !document.getElementById('category').disabled"
        " || !document.getElementById('error').hidden"
    )
    assert page.locator("#error").is_hidden(), page.inner_text("#error")


def submit(page: Page, path: Path, category: str | None) -> None:
    """Choose the category (None: auto) and the file, press Inspect, wait for the outcome."""
    if category is None:
        page.select_option("#category", label="auto (router)")
    else:
        page.select_option("#category", value=category)
    page.set_input_files("#file", str(path))
    page.get_by_role("button", name="Inspect").click()
    page.wait_for_function(
        "() => document.getElementById('verdict').dataset.verdict"
        " || !document.getElementById('error').hidden"
    )


def inspect_in_page(page: Page, url: str, path: Path, category: str | None) -> None:
    open_page(page, url)
    submit(page, path, category)
    assert page.locator("#error").is_hidden(), page.inner_text("#error")
    page.locator("#verdict").wait_for(state="visible")


def canvas_stats(page: Page) -> dict[str, float]:
    """Size and pixel variance of the result canvas; keeps its pixels for `canvas_change`."""
    return page.evaluate(
        """() => {
            const c = document.getElementById('view');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            window.__pixels = d;
            let n = 0, sum = 0, sq = 0;
            for (let i = 0; i < d.length; i += 4) {
                const v = d[i] + d[i + 1] + d[i + 2];
                n += 1; sum += v; sq += v * v;
            }
            return {width: c.width, height: c.height, variance: sq / n - (sum / n) ** 2};
        }"""
    )


def canvas_change(page: Page) -> float:
    """Mean absolute change per channel since the last `canvas_stats`."""
    return page.evaluate(
        """() => {
            const c = document.getElementById('view');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            const before = window.__pixels;
            let diff = 0;
            for (let i = 0; i < d.length; i++) diff += Math.abs(d[i] - before[i]);
            return diff / d.length;
        }"""
    )


def test_defective_part_shows_what_the_service_answers(
    page: Page,
    serving: Any,
    categories: dict[str, Any],
    inspection_images: dict[str, Path],
    inspection_categories: dict[str, str],
) -> None:
    image = inspection_images["synthetic_defective"]
    category = inspection_categories["synthetic_defective"]
    inspect_in_page(page, serving.url, image, category)

    # The options' defaults: explain on; boxes on exactly when a localizer exists.
    assert page.is_checked("#explain")
    assert page.is_checked("#boxes") == categories["localizer"]
    assert page.is_disabled("#boxes") == (not categories["localizer"])
    response = inspect_over_http(
        serving.url, image, category, explain=True, boxes=categories["localizer"]
    )
    assert response.status_code == 200, response.text
    result = response.json()

    verdict = page.locator("#verdict")
    assert verdict.inner_text().strip().lower() == result["verdict"]
    assert verdict.get_attribute("data-verdict") == result["verdict"]
    assert page.inner_text("#decided-by") == result["decided_by"]
    assert result["category"] in page.inner_text("#category-out")
    assert page.inner_text("#latency").endswith("ms")

    types = page.locator("#defect-types li")
    assert types.count() == len(result["defect_types"])
    if result["defect_types"]:
        assert result["defect_types"][0]["name"] in types.first.inner_text()
    assert page.locator("#trace tbody tr").count() == len(result["trace"])
    assert page.locator("#trace tr").count() == len(result["trace"]) + 1  # the header row

    # The canvas shows the image at its own aspect, not a blank.
    stats = canvas_stats(page)
    with Image.open(image) as pil:
        width, height = pil.size
    assert stats["width"] / stats["height"] == pytest.approx(width / height, rel=0.01)
    assert stats["variance"] > 1.0
    # With an explanation, the heatmap overlay shows: hiding it changes the pixels.
    assert result["heatmap_png"], "explain=true gave no heatmap"
    page.locator("#opacity").fill("0")
    assert canvas_change(page) > 1.0


def test_auto_category_shows_the_routed_category(
    page: Page,
    serving: Any,
    categories: dict[str, Any],
    inspection_images: dict[str, Path],
) -> None:
    if not categories["router"]:
        pytest.skip("no category router deployed, so the page offers no auto category")
    image = inspection_images["elpv_good"]
    inspect_in_page(page, serving.url, image, None)
    response = inspect_over_http(
        serving.url, image, None, explain=True, boxes=categories["localizer"]
    )
    assert response.status_code == 200, response.text
    result = response.json()

    assert page.get_attribute("#verdict", "data-verdict") == result["verdict"]
    shown = page.inner_text("#category-out")
    assert result["category"] in shown
    assert ("routed" in shown) == result["category_routed"]


def test_a_text_file_shows_the_415_and_its_detail(
    page: Page,
    serving: Any,
    tmp_path: Path,
    inspection_categories: dict[str, str],
) -> None:
    text_file = tmp_path / "notes.txt"
    text_file.write_text("shift notes: line 3 stopped at 14:05\n")
    category = inspection_categories["synthetic_good"]
    response = inspect_over_http(serving.url, text_file, category, explain=True, boxes=False)
    assert response.status_code == 415, response.text

    open_page(page, serving.url)
    submit(page, text_file, category)
    error = page.locator("#error")
    assert error.is_visible()
    assert "415" in error.inner_text()
    assert response.json()["detail"] in error.inner_text()
    assert page.locator("#verdict").is_hidden()


def test_screenshot_of_an_answer(
    page: Page,
    serving: Any,
    tmp_path: Path,
    inspection_images: dict[str, Path],
    inspection_categories: dict[str, str],
) -> None:
    inspect_in_page(
        page,
        serving.url,
        inspection_images["synthetic_defective"],
        inspection_categories["synthetic_defective"],
    )
    shot = tmp_path / "operator_page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    with Image.open(shot) as png:
        assert png.format == "PNG"
        assert png.width >= 1280


def test_a_person_reviews_a_queued_answer_and_the_export_holds_it(
    page: Page, serving: Any, tmp_path: Path, inspection_images: dict[str, Path]
) -> None:
    """Queue an answer, correct it in the review view, export it for retraining."""
    from cluster.cli import main
    from models.data import load_dataset
    from tests.integration.serving.conftest import SURFACE

    # New bytes (one pixel changed): a cached answer is never queued.
    fresh = tmp_path / "part.png"
    with Image.open(inspection_images["synthetic_good"]) as image:
        image = image.convert("RGB")
        image.putpixel((0, 0), (1, 2, 3))
        image.save(fresh)
    serving.deploy(service={"review": {"sample_share": 1.0}})  # every answer asks for a look
    try:
        answer = inspect_over_http(serving.url, fresh, SURFACE, explain=False, boxes=False).json()
        # Queued just after the answer went: within moments.
        deadline, found = time.monotonic() + 30, []
        while not found and time.monotonic() < deadline:
            queued = requests.get(
                f"{serving.url}/v1/reviews?limit=5&newest=true", timeout=HTTP_TIMEOUT_S
            ).json()
            found = [i for i in queued["items"] if i["id"] == answer["request_id"]]
            time.sleep(0.2)
        [item] = found
        reason = "ambiguous" if answer["decided_by"] == "verifier" else "sampled"
        if reason == "sampled" and answer["verdict"] == "defective":
            reason = "unsure-type" if answer["defect_types"][0]["score"] < 0.5 else reason
        assert (item["verdict"], item["reason"]) == (answer["verdict"], reason)

        open_page(page, serving.url)
        page.check("#review-newest")  # earlier tests' answers wait in the queue too
        page.click("#review-load")
        page.locator(f'#review-list button[data-id="{item["id"]}"]').click()
        page.locator("#review-form").wait_for(state="visible")
        # The part is shown as the service sees it now, with its heatmap.
        assert page.locator("#verdict").inner_text().lower() == answer["verdict"]
        assert page.locator("#opacity-row").is_visible()
        assert page.locator("#review-ok").is_checked() == (answer["verdict"] == "ok")
        page.check("#review-defective")
        page.fill("#review-type", "smudge")  # a type no model knows yet
        page.fill("#review-note", "oil film near the edge")
        shot = tmp_path / "review_view.png"
        page.screenshot(path=str(shot), full_page=True)
        print(f"review view: {shot}")
        page.click("#review-submit")
        page.wait_for_function(
            "() => document.getElementById('review-status').textContent.startsWith('Saved')"
        )
        said = page.inner_text("#review-status")
        assert "smudge" in said and "anonymous" in said and "correction" in said, said

        # It left the queue, and the reviewer's own look was not queued again.
        left = requests.get(f"{serving.url}/v1/reviews?limit=500", timeout=HTTP_TIMEOUT_S).json()
        assert item["id"] not in [i["id"] for i in left["items"]]
        assert answer["image_sha256"] not in [i["image_sha256"] for i in left["items"]]
    finally:
        serving.deploy(service={"review": {"sample_share": 0.02}})

    out = tmp_path / "reviews"
    command = ["reviews", "export", "--out", str(out), "--redis-url", serving.redis_url]
    assert main([*command, "--workdir", str(tmp_path)]) == 0
    [sample] = [s for s in load_dataset("coco", out).samples if s.image_path.stem == item["id"]]
    assert (sample.category, sample.label) == (SURFACE, "smudge")
    with Image.open(sample.image_path) as exported, Image.open(fresh) as sent:
        assert exported.size == sent.size


def test_reviewers_teach_a_type_and_the_retrained_classifier_is_promoted_for_beating_production(
    page: Page, serving: Any, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Review, export, retrain, promote, on a copy of the line's registry.

    The line's classifier never learnt scratches (trained with them held out);
    reviewers name the scratched parts in the review view; retraining on the
    export learns the type, beats production on the held-out test split (which
    has scratches) and is promoted.
    """
    import json
    import shutil

    from cluster.cli import main
    from cluster.quickstart import quick_datasets
    from models.artifacts import CANDIDATE, ArtifactRegistry
    from tests.integration.serving.conftest import QUICK, SURFACE

    taught = "scratch"
    synthetic, _ = quick_datasets(serving.workdir, QUICK)
    parts = [s.image_path for s in synthetic.select(SURFACE, "train") if s.label == taught]
    line = tmp_path / "registry"
    shutil.copytree(serving.registry_uri, line)
    # The line's reranker already names scratches from their description (with it,
    # production and the candidate tie on the held-out split); without it, the
    # classifier alone names types, which is what the reviews teach.
    shutil.rmtree(line / SURFACE / "reranker")
    data = ["--dataset", "synthetic", "--root", str(serving.workdir / "quickstart-synth")]
    classifier = [
        "train", "classifier", *data, "--category", SURFACE, "--registry", str(line),
        "--hold-out", taught, "--model-option", "embedding=patch", "--input-size", "128",
        "--storage", str(tmp_path / "runs"), "--mlflow-uri", "none",
    ]  # fmt: skip
    assert main(classifier) == 0  # production: a classifier that knows no scratch
    registry = ArtifactRegistry(str(line))
    production = registry.manifest(SURFACE, "classifier")
    assert taught not in production.config["defect_types"]
    capsys.readouterr()

    # The reviewers' work: every scratched part the line sent, named in the review view.
    serving.deploy(service={"review": {"sample_share": 1.0}})
    try:
        ids = []
        for n, path in enumerate(parts):
            fresh = tmp_path / f"part{n}.png"
            with Image.open(path) as image:
                image = image.convert("RGB")
                image.putpixel((0, 0), (n, 2, 3))  # new bytes: never a cached answer
                image.save(fresh)
            answer = inspect_over_http(serving.url, fresh, SURFACE, explain=False, boxes=False)
            ids.append(answer.json()["request_id"])
        deadline, queued = time.monotonic() + 30, set()
        while not set(ids) <= queued and time.monotonic() < deadline:
            listed = requests.get(
                f"{serving.url}/v1/reviews?limit=50&newest=true", timeout=HTTP_TIMEOUT_S
            ).json()
            queued = {i["id"] for i in listed["items"]}
            time.sleep(0.2)
        assert set(ids) <= queued
    finally:
        serving.deploy(service={"review": {"sample_share": 0.02}})
    open_page(page, serving.url)
    page.check("#review-newest")
    page.click("#review-load")
    for review_id in ids:
        page.locator(f'#review-list button[data-id="{review_id}"]').click()
        page.locator("#review-form").wait_for(state="visible")
        page.check("#review-defective")
        page.fill("#review-type", taught)
        page.click("#review-submit")
        page.wait_for_function(
            "() => document.getElementById('review-status').textContent.startsWith('Saved')"
        )
        assert f"({taught})" in page.inner_text("#review-status")

    out = tmp_path / "reviews"
    export = ["reviews", "export", "--out", str(out), "--redis-url", serving.redis_url]
    assert main([*export, "--category", SURFACE, "--workdir", str(tmp_path)]) == 0
    capsys.readouterr()
    assert main([*classifier, "--with-reviews", str(out)]) == 0
    said = json.loads(capsys.readouterr().out)
    assert said["reviews"]["labels"][taught] == len(parts)
    judged = said["judged"]["categories"][SURFACE]
    top1 = judged["figures"]["defect_type_top1"]
    print(f"held-out defect-type top-1: production {top1['production']:.3f}, "
          f"candidate {top1['candidate']:.3f}: {judged['reason']}")  # fmt: skip
    assert judged["promoted"], judged
    assert top1["candidate"] > top1["production"]
    promoted = registry.manifest(SURFACE, "classifier")
    assert promoted.version == judged["promoted_versions"]["classifier"] != production.version
    assert taught in promoted.config["defect_types"]
    for stage, version in judged["promoted_versions"].items():
        assert registry.resolve(SURFACE, stage) == version
    assert all(CANDIDATE not in registry.aliases(SURFACE, s) for s in registry.stages(SURFACE))
