"""Bring your own model and data, in a real browser (``streamlit run`` headless, Debian's Chromium, Playwright).

A person picks ``torchvision model… → mobilenet_v3_small``, uploads a state_dict of their own (10
classes, 32 px; saved here into a temporary folder), uploads a .zip of labelled CIFAR-10 JPEGs (two
class folders), sees the preview grid and the class mapping, moves τ on Explore and sees the accuracy
on their images for the new setting, runs the τ sweep on the Tune page, and uploads a hostile zip
(an entry ``../evil.txt``): a clear error, and the app keeps working. Screenshots go to
``results/screenshots/user_*.png``.

The server fixture, the browser settings and the slider helper are those of
:mod:`tests.app.test_browser` (imported, not copied). Skipped like that test when Chromium or
Playwright is missing.
"""
from __future__ import annotations

import re
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
import torch

from core.workloads.data import jpeg_dir
from tests.app.test_browser import (  # the server fixture and browser helpers of the first browser test
    CHROMIUM,
    LAUNCH_ARGS,
    ROOT,
    SHOTS,
    TAU_SLIDER,
    _move_slider,
    _retention,
    app_url,  # noqa: F401 (a fixture: pytest finds it by name in this module)
)

pytestmark = pytest.mark.browser

CLASSES = {"cat": 6, "ship": 6}  # CIFAR-10 class names: they map to the model's outputs 3 and 8 by name
N_IMAGES = sum(CLASSES.values())
CIFAR_INPUT = {"Image size (px)": "32", "Mean (R, G, B)": "0.4914, 0.4822, 0.4465",
               "Std (R, G, B)": "0.2470, 0.2435, 0.2616"}
STEP_TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def user_files(tmp_path_factory) -> dict[str, Path]:
    """The person's files: a mobilenet_v3_small state_dict (10 classes), a labelled zip and a hostile zip."""
    from core.measure.accuracy import bn_recalibrate
    from core.workloads import torchvision_models as tv

    cifar_test = jpeg_dir() / "cifar10-test.tar.gz"
    if not cifar_test.is_file():
        pytest.skip(f"{cifar_test} not found (the CIFAR-10 JPEG copy, see its README)")
    folder = tmp_path_factory.mktemp("user_files")
    torch.manual_seed(0)  # random init; BN statistics estimated on noise so the outputs are not ~1e-10
    model = bn_recalibrate(tv.build("mobilenet_v3_small", {"num_classes": 10}).eval(), torch.randn(32, 3, 32, 32))
    torch.save(model.state_dict(), folder / "my_mnv3.pt")
    counts = dict.fromkeys(CLASSES, 0)
    with tarfile.open(cifar_test) as tar, zipfile.ZipFile(folder / "my_images.zip", "w") as archive:
        for member in tar:  # test/<class>/NNNN.jpg
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 3 and parts[1] in CLASSES and counts[parts[1]] < CLASSES[parts[1]]:
                archive.writestr(f"val/{parts[1]}/{parts[2]}", tar.extractfile(member).read())
                counts[parts[1]] += 1
            if counts == CLASSES:
                break
    assert counts == CLASSES, counts
    with zipfile.ZipFile(folder / "evil.zip", "w") as archive:
        archive.writestr("val/cat/0.jpg", (folder / "my_images.zip").read_bytes()[:10])
        archive.writestr("../evil.txt", b"written outside the folder")
    return {"weights": folder / "my_mnv3.pt", "images": folder / "my_images.zip", "evil": folder / "evil.zip"}


@pytest.fixture(scope="module")
def expected(user_files) -> dict:
    """What the page must show, computed here with the engine: retention per τ and fp32 accuracy on the images."""
    from core.measure.accuracy import EvalData, evaluate
    from core.method.config import CompressionConfig
    from core.method.engine import Engine
    from core.workloads import torchvision_models as tv
    from core.workloads.data import CLASSES as CIFAR_CLASSES
    from core.workloads.image_folder import for_model, read_image_zip
    from core.workloads.preprocess import Preprocess

    model, _, _ = tv.read_weights_file("mobilenet_v3_small", user_files["weights"])
    preprocess = Preprocess.for_size(32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "test")
    images, _ = for_model(read_image_zip(user_files["images"].read_bytes(), "my_images.zip", preprocess),
                          CIFAR_CLASSES, 10)
    data = EvalData(images.images, images.labels, "user")
    engine = Engine(model)
    out = {"retention": {}, "accuracy": {None: evaluate(model, data).accuracy}}
    for tau in (0.1, 0.3, 0.35):
        result = engine.apply(CompressionConfig(tau=tau))
        out["retention"][tau] = f"{100 * result.retention:.1f} %"
        out["accuracy"][tau] = evaluate(result.model, data).accuracy
    return out


def _pick(page, label: str, option: str) -> None:
    """Choose ``option`` in the selectbox ``label`` (a combobox: type to filter, click the option)."""
    from playwright.sync_api import expect

    box = page.get_by_role("combobox", name=label)
    box.click()
    box.fill(option)
    page.get_by_role("option", name=option, exact=True).click()
    expect(box).to_have_value(option)


def _type(page, label: str, value: str) -> None:
    """Type ``value`` into the text or number input ``label`` and commit it (retried: a rerun can reset it)."""
    box = page.get_by_label(label, exact=True)
    for _ in range(10):
        box.fill(value)
        box.press("Enter")
        page.wait_for_timeout(500)
        if box.input_value() == value:
            return
    raise AssertionError(f"{label} kept {box.input_value()!r}, not {value!r}")


def _upload(page, uploader_text: str, path: Path) -> None:
    """Choose ``path`` in the uploader ``uploader_text`` and wait, as a person does, until the file shows there
    (another widget's rerun while the upload is still in flight can lose the file in Streamlit's uploader)."""
    from playwright.sync_api import expect

    uploader = page.locator('[data-testid="stFileUploader"]').filter(has_text=uploader_text)
    uploader.locator('input[type="file"]').set_input_files(str(path))
    expect(uploader.get_by_role("button", name=f"Remove {path.name}")).to_be_visible()  # shown names are shortened


def _accuracy_detail(page) -> tuple[float, float, int] | None:
    """(compressed %, dense %, images) as the accuracy metric shows them, or None while it is measuring."""
    metric = page.locator('[data-testid="stMetric"]').filter(has_text="Accuracy Δ vs dense")
    delta = metric.locator('[data-testid="stMetricDelta"]')
    if delta.count() == 0:
        return None
    found = re.search(r"([\d.]+) ?% \(dense ([\d.]+) ?%\), n = ([\d,]+)", delta.inner_text())
    return None if found is None else (float(found[1]), float(found[2]), int(found[3].replace(",", "")))


def _wait_accuracy(page, n: int, timeout_s: float = 60) -> tuple[float, float, int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        shown = _accuracy_detail(page)
        if shown is not None and shown[2] == n:
            return shown
        page.wait_for_timeout(200)
    raise AssertionError(f"no accuracy on {n} images within {timeout_s} s (shown: {_accuracy_detail(page)})")


def test_own_model_and_images_in_the_browser(app_url, user_files, expected, tmp_path):  # noqa: F811 (the imported fixture)
    from playwright.sync_api import expect, sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    one_image = 100 / N_IMAGES + 0.05  # the app infers in bf16 where the CPU has it; this is fp32: one image apart
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
        expect.set_options(timeout=STEP_TIMEOUT_MS)  # each step may wait for a model load on a busy 2-core CPU
        try:
            page = browser.new_context(viewport={"width": 1500, "height": 1300}).new_page()
            page.set_default_timeout(STEP_TIMEOUT_MS)
            page.goto(app_url)
            expect(page.locator(TAU_SLIDER)).to_have_value("0.1", timeout=90_000)  # the safe starting point
            sidebar = page.locator('[data-testid="stSidebar"]')
            main = page.locator('[data-testid="stMain"]')

            # the model: torchvision mobilenet_v3_small with the person's state_dict, CIFAR-sized input
            _pick(page, "Model", "torchvision model…")
            _pick(page, "torchvision architecture", "mobilenet_v3_small")
            sidebar.get_by_text("upload a state_dict (.pt/.pth/.safetensors)").click()
            _upload(page, "State dict of mobilenet_v3_small", user_files["weights"])
            for label, value in CIFAR_INPUT.items():
                _type(page, label, value)
            sidebar.get_by_role("button", name="Load this torchvision model").click()
            loaded = main.get_by_text(re.compile(r"my_mnv3\.pt .*mobilenet_v3_small")).first
            expect(loaded).to_be_visible(timeout=120_000)  # reading, checking and snapshotting the upload
            expect(_retention(page)).to_have_text(expected["retention"][0.1])

            # the data: a zip of labelled images; the summary, the class mapping and the preview grid
            sidebar.get_by_text("my images (.zip of class folders)").click()
            _upload(page, "Images (.zip", user_files["images"])
            expect(sidebar.get_by_text(re.compile(f"{N_IMAGES} images in {len(CLASSES)} classes"))).to_be_visible()
            expect(sidebar.get_by_text(re.compile("2 class folders and the model 10 outputs"))).to_be_visible()
            sidebar.get_by_text("Preview of the processed images").click()
            preview = sidebar.locator('[data-testid="stExpander"]').filter(has_text="Preview of the processed images")
            expect(preview.locator("img")).to_have_count(8)
            expect(preview.get_by_text("by the weights' category names")).to_be_visible()
            mapping = preview.locator('[data-testid="stDataFrame"] [role="gridcell"]')
            expect(mapping).to_have_text(["3", "cat", "6", "8", "ship", "6"])
            preview.scroll_into_view_if_needed()  # the sidebar scrolls on its own: show the preview in the shot
            page.screenshot(path=str(SHOTS / "user_data_preview.png"))

            # Explore: the accuracy on the person's images, for the setting the slider shows
            compressed, dense, _ = _wait_accuracy(page, N_IMAGES)
            assert abs(dense - 100 * expected["accuracy"][None]) <= one_image, (dense, expected)
            slider = page.locator(TAU_SLIDER)
            _move_slider(page, slider, 0.3)
            expect(_retention(page)).to_have_text(expected["retention"][0.3])
            deadline = time.monotonic() + 60
            while True:  # the figure for τ = 0.3 (one image of tolerance for bf16 against fp32)
                compressed, dense, _ = _wait_accuracy(page, N_IMAGES)
                if abs(compressed - 100 * expected["accuracy"][0.3]) <= one_image or time.monotonic() > deadline:
                    break
                page.wait_for_timeout(200)
            assert abs(compressed - 100 * expected["accuracy"][0.3]) <= one_image, (compressed, expected)
            expect(main.get_by_text("Accuracy on your images")).to_be_visible()
            page.screenshot(path=str(SHOTS / "user_explore_tau_0.30.png"), full_page=True)

            # Tune: the τ sweep on the same images, and the largest τ within X points
            sidebar.get_by_role("link", name="Tune").click()
            run = main.get_by_role("button", name="Run τ sweep")
            expect(run).to_be_visible()
            run.click()
            expect(main.get_by_text(re.compile("Largest τ within"))).to_be_visible(timeout=120_000)
            expect(main.get_by_text(re.compile(f"on all {N_IMAGES} of your labelled images")).first).to_be_visible()
            expect(main.locator('[data-testid="stDataFrame"]')).not_to_have_count(0)  # the sweep's table
            expect(main.locator('[data-testid="stAlertContentError"]')).to_have_count(0)
            page.screenshot(path=str(SHOTS / "user_tune_sweep.png"), full_page=True)

            # a hostile archive: one clear error, the data goes back to CIFAR-10, the app keeps working
            _upload(page, "Images (.zip", user_files["evil"])
            error = sidebar.locator('[data-testid="stAlertContentError"]')
            expect(error).to_contain_text("climbs out of the folder")
            expect(error).to_contain_text("../evil.txt")
            expect(main.get_by_text(re.compile("Every point is a measured CIFAR-10 accuracy"))).to_be_visible()
            error.scroll_into_view_if_needed()
            page.screenshot(path=str(SHOTS / "user_hostile_zip.png"))
            sidebar.get_by_role("link", name="Explore").click()
            slider = page.locator(TAU_SLIDER)
            expect(slider).to_have_value("0.3")
            _move_slider(page, slider, 0.35)
            expect(_retention(page)).to_have_text(expected["retention"][0.35])
            expect(page.get_by_text(re.compile("Traceback"))).to_have_count(0)

            # Export: the packed file of this setting, downloaded, then uploaded back as the model
            sidebar.get_by_role("link", name="Export").click()
            main.get_by_role("button", name="Pack the model").click()
            download = main.get_by_role("button", name="Download packed model (.safetensors)")
            expect(download).to_be_visible(timeout=120_000)
            with page.expect_download() as downloaded:
                download.click()
            packed = tmp_path / downloaded.value.suggested_filename
            downloaded.value.save_as(packed)
            assert packed.stat().st_size > 0
            page.screenshot(path=str(SHOTS / "user_export.png"), full_page=True)
            _pick(page, "Model", "Upload a state_dict…")
            _upload(page, "State dict (.pt/.pth/.safetensors", packed)
            expect(main).to_contain_text("Uploaded:", timeout=120_000)  # the Export page names the model it exports
            expect(main).to_contain_text(".packed.safetensors")
            sidebar.get_by_role("link", name="Explore").click()
            slider = page.locator(TAU_SLIDER)
            expect(slider).to_have_value("0.35")
            # the uploaded model is the pruned one: at the same τ exactly the same weights survive
            expect(_retention(page)).to_have_text(expected["retention"][0.35])
            expect(main.locator('[data-testid="stAlertContentError"]')).to_have_count(0)
            page.screenshot(path=str(SHOTS / "user_uploaded_back.png"), full_page=True)
        finally:
            expect.set_options(timeout=5_000)  # Playwright's default, for the other tests of this process
            browser.close()
    assert not (jpeg_dir() / "evil.txt").exists() and not (ROOT / "evil.txt").exists() and not (
        ROOT.parent / "evil.txt").exists()
