"""End to end in a real browser: ``streamlit run`` headless, Debian's Chromium driven by Playwright.

Skipped (with the reason) when ``/usr/bin/chromium`` or the ``playwright`` package is missing;
CI installs both (``.ci/run``). Screenshots go to ``results/screenshots/`` (git-ignored).
"""
from __future__ import annotations

import re
import time

import pytest

from tests.app.browser_tools import (  # noqa: F401 (ROOT: test_browser_user_models imports it from here)
    CHROMIUM,
    LAUNCH_ARGS,
    ROOT,
    SHOTS,
    press,
    require_browser,
    streamlit_server,
)

pytestmark = pytest.mark.browser

TAU_SLIDER = 'input[type="range"][aria-label^="τ — boundary"]'


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """The app served as the README says (settings from .streamlit/config.toml), for this module's tests."""
    require_browser()
    with streamlit_server(tmp_path_factory.mktemp("streamlit") / "server.log") as server:
        yield server.url


def _retention(page):
    return page.locator('[data-testid="stMetric"]').filter(has_text="Retention").locator(
        '[data-testid="stMetricValue"]')


def _move_slider(page, slider, target: float, step: float = 0.01) -> None:
    """Exactly as many key presses as the move takes, with no check or retry in between: every press must land."""
    from playwright.sync_api import expect

    presses = round((target - float(slider.input_value())) / step)
    press(page, slider, "ArrowRight" if presses > 0 else "ArrowLeft", abs(presses), 10)
    expect(slider).to_have_value(f"{target:g}", timeout=30_000)


def _expected_retention_texts(*taus: float) -> dict[float, str]:
    """The retention the page must show at each τ, computed here with the engine on the same default model."""
    from core.services.choices import load_choice, model_choices
    from core.method.config import CompressionConfig
    from core.method.engine import Engine

    engine = Engine(load_choice(model_choices()[0].key).model)
    return {tau: f"{100 * engine.apply(CompressionConfig(tau=tau)).retention:.1f} %" for tau in taus}


def test_moving_tau_updates_retention_in_the_browser(app_url):
    from playwright.sync_api import expect, sync_playwright

    expected = _expected_retention_texts(0.1, 0.3, 0.15, 0.31)
    assert len(set(expected.values())) == 4  # the four settings are distinguishable on the page
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
        try:
            first = browser.new_context(viewport={"width": 1500, "height": 1300}).new_page()
            first.goto(app_url)
            slider = first.locator(TAU_SLIDER)
            expect(slider).to_have_value("0.1", timeout=90_000)  # the safe starting point
            retention = _retention(first)
            expect(retention).to_have_text(expected[0.1], timeout=90_000)
            first.screenshot(path=str(SHOTS / "explore_tau_0.10.png"), full_page=True)

            _move_slider(first, slider, 0.3)
            expect(retention).to_have_text(expected[0.3], timeout=30_000)
            expect(first.get_by_text(re.compile("Server-side update time"))).to_be_visible(timeout=30_000)
            first.screenshot(path=str(SHOTS / "explore_tau_0.30.png"), full_page=True)

            # a second user: own session, own τ; the first user's page does not move
            second = browser.new_context(viewport={"width": 1500, "height": 1300}).new_page()
            second.goto(app_url)
            other = second.locator(TAU_SLIDER)
            expect(other).to_have_value("0.1", timeout=90_000)
            expect(_retention(second)).to_have_text(expected[0.1], timeout=90_000)
            _move_slider(second, other, 0.15)
            expect(_retention(second)).to_have_text(expected[0.15], timeout=30_000)
            expect(slider).to_have_value("0.3")
            expect(retention).to_have_text(expected[0.3])
            # the first user's next move starts from its own τ, not from the other user's
            _move_slider(first, slider, 0.31)
            expect(retention).to_have_text(expected[0.31], timeout=30_000)
            expect(_retention(second)).to_have_text(expected[0.15])
            first.screenshot(path=str(SHOTS / "explore_tau_0.31.png"), full_page=True)
        finally:
            browser.close()


def _accuracy(page):
    return page.locator('[data-testid="stMetric"]').filter(has_text="Accuracy Δ vs dense")


def _images_and_half_width(page) -> tuple[int, float] | None:
    """(images measured, ± points) as the accuracy metric shows them now, or None before its first figure."""
    metric = _accuracy(page)
    if metric.count() == 0:
        return None
    label = metric.locator('[data-testid="stMetricLabel"]').inner_text()
    delta = metric.locator('[data-testid="stMetricDelta"]')
    if "±" not in label or delta.count() == 0:
        return None
    images = re.search(r"n = ([\d,]+)", delta.inner_text())
    half = re.search(r"±([\d.]+)", label)
    if not (images and half):
        return None
    return int(images.group(1).replace(",", "")), float(half.group(1))


def test_accuracy_refines_in_place_and_restarts_on_a_move(app_url):
    """Move τ, leave the slider alone: the paired interval narrows by itself; move again mid-way: it restarts."""
    from playwright.sync_api import expect, sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1500, "height": 1300}).new_page()
            page.goto(app_url)
            slider = page.locator(TAU_SLIDER)
            expect(slider).to_have_value("0.1", timeout=90_000)  # the safe starting point
            _move_slider(page, slider, 0.08)
            seen: list[tuple[int, float]] = []
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:  # no input: watch the figure refine
                now = _images_and_half_width(page)
                if now and (not seen or now != seen[-1]):
                    seen.append(now)
                    if len(seen) == 2:
                        page.screenshot(path=str(SHOTS / "accuracy_refining.png"), full_page=True)
                if now and now[1] <= 1.0:
                    break
                page.wait_for_timeout(150)
            assert len(seen) >= 3, seen  # several refinements arrived without any input
            images = [n for n, _ in seen]
            assert images == sorted(images) and images[-1] > images[0], seen
            assert seen[-1][1] < seen[0][1] and seen[-1][1] <= 1.0, seen
            page.screenshot(path=str(SHOTS / "accuracy_within_1_point.png"), full_page=True)

            _move_slider(page, slider, 0.12)  # a new setting while the old one is done: starts again
            restarted = None
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                now = _images_and_half_width(page)
                if now and now[0] < images[-1]:
                    restarted = now
                    break
                page.wait_for_timeout(100)
            assert restarted is not None, "the estimate did not restart for the new setting"
            _move_slider(page, slider, 0.14)  # and again while that one refines: interrupts at once
            expect(_retention(page)).to_have_text(_expected_retention_texts(0.14)[0.14], timeout=30_000)
            page.screenshot(path=str(SHOTS / "accuracy_restarted.png"), full_page=True)
        finally:
            browser.close()
