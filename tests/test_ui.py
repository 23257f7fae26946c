"""The web demo in a real headless Chromium (Debian's `chromium`, driven by Playwright): upload a DICOM
file, ask, watch the answer arrive, ask again, change the image; upload a scan (a NIfTI phantom, a
zipped DICOM series), see three of its slabs, ask about it. Screenshots go to the test's tmp
dir. docs/ui-screenshot.png comes from `test_docs_screenshot`, run by hand with a trained model:
MEDVL_DOCS_MODEL=runs/quickstart/stage3/final MEDVL_DOCS_IMAGE=<a real scan> pytest tests/test_ui.py."""

from __future__ import annotations

import os
import shutil
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from test_serve import build_tiny_model, free_port

from medvl import RESEARCH_ONLY
from medvl.imaging import read_image, scan_slabs
from medvl.model.build import load
from medvl.model.decode import Conversation, generate

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MAX_NEW_TOKENS = 12
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium not installed")


def expected(vlm, turns: list[tuple[str, str]], question: str, images: list) -> str:
    """The model's in-process answer to `question` after `turns`, the images (one image part each) with
    the first turn."""
    messages = []
    for q, a in turns:
        messages += [
            {"role": "user", "content": [{"type": "text", "text": q}]},
            {"role": "assistant", "content": a},
        ]
    messages.append({"role": "user", "content": [{"type": "text", "text": question}]})
    messages[0]["content"][:0] = [{"type": "image"}] * len(images)
    return generate(vlm, [Conversation(messages, images)], max_new_tokens=MAX_NEW_TOKENS)[0].text


@contextmanager
def demo_page(vlm, height: int = 800, **launch_kw) -> Iterator:
    """The demo of `vlm` on a loopback port, open in headless Chromium (a Playwright page); the page
    must ask nothing of the internet."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    from playwright.sync_api import sync_playwright

    from medvl.serve.ui import launch

    port = free_port()
    demo = launch(vlm, port=port, max_new_tokens=MAX_NEW_TOKENS, **launch_kw)
    external: list[str] = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": height})
            page.on("request", lambda r: external.append(r.url) if "127.0.0.1" not in r.url else None)
            page.goto(f"http://127.0.0.1:{port}/")
            yield page
            browser.close()
    finally:
        demo.close()
    assert external == []


def visible(text: str) -> str:
    """Text as compared on screen: control characters (which the random-weight model emits, and
    browsers drop or show differently) removed, whitespace runs collapsed."""
    text = "".join(ch if ch.isprintable() else " " if ch in "\n\t\r" else "" for ch in text)
    return " ".join(text.split(" ")).strip()


def wait_for_answer(locator, want: str, timeout_s: float = 60) -> None:
    """Until the streamed answer on the page is the whole expected answer."""
    deadline = time.monotonic() + timeout_s
    while visible(locator.inner_text()) != visible(want):
        assert time.monotonic() < deadline, f"answer on page {locator.inner_text()!r}, expected {want!r}"
        time.sleep(0.2)


def test_upload_ask_and_see_the_answer(tmp_path):
    from playwright.sync_api import expect

    vlm = load(build_tiny_model(tmp_path / "m"))
    # The expected answers, computed before the demo starts: the test must not run the model while
    # the demo's worker does.
    size = vlm.model.config.vision_config.image_size  # the demo reads images at the model's size
    ct, us = get_testdata_file("CT_small.dcm"), get_testdata_file("US1_UNCR.dcm")
    turns: list[tuple[str, str]] = []
    for q in ("What does the CT show?", "Is there a mass?"):
        turns.append((q, expected(vlm, turns, q, [read_image(ct, vlm.preprocessing, size=size)])))
    us_question = "Describe the ultrasound."
    us_answer = expected(vlm, [], us_question, [read_image(us, vlm.preprocessing, size=size)])
    with demo_page(vlm) as page:
        expect(page.get_by_text(RESEARCH_ONLY)).to_be_visible()

        page.locator("#upload input[type=file]").set_input_files(ct)
        expect(page.locator("#preview img")).to_be_visible(timeout=30_000)  # windowed DICOM shown

        bot = page.locator("#chat [data-testid=bot]")
        question = page.locator("#question textarea")
        for i, (q, want) in enumerate(turns):
            question.fill(q)
            question.press("Enter")
            expect(bot).to_have_count(i + 1, timeout=60_000)
            wait_for_answer(bot.last, want)
        expect(page.locator("#chat [data-testid=user]")).to_have_text([q for q, _ in turns])
        page.screenshot(path=tmp_path / "ui-ct.png", full_page=True)

        # a new image (colour ultrasound DICOM) starts a new conversation
        ct_src = page.locator("#preview img").get_attribute("src")
        page.locator("#upload button[aria-label='Clear']").first.click()
        page.locator("#upload input[type=file]").set_input_files(us)
        expect(bot).to_have_count(0, timeout=30_000)
        # the upload is handled once the preview shows the new image
        expect(page.locator("#preview img")).to_be_visible(timeout=30_000)
        expect(page.locator("#preview img")).not_to_have_attribute("src", ct_src, timeout=30_000)
        question.fill(us_question)
        question.press("Enter")
        expect(bot).to_have_count(1, timeout=60_000)
        wait_for_answer(bot.last, us_answer)
        page.screenshot(path=tmp_path / "ui-us.png", full_page=True)
    assert (tmp_path / "ui-ct.png").stat().st_size > 10_000


def test_upload_a_scan_see_its_slabs_and_ask(tmp_path):
    """A NIfTI phantom: three of its K slabs shown, the answer the model's own to all K slabs (read as
    the server reads a scan); a zipped DICOM series shown the same way; a truncated scan refused with
    its reason on the page."""
    import pydicom
    from playwright.sync_api import expect

    from medvl.synth.volumes import write_phantoms

    vlm = load(build_tiny_model(tmp_path / "m"))
    phantom = write_phantoms(tmp_path / "phantom", 1, shape=(16, 48, 48), seed=4)[0]
    series = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
    with zipfile.ZipFile(tmp_path / "ct5n.zip", "w") as z:
        for f in sorted(series.iterdir()):
            z.write(f, f"CT5N/{f.name}")
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(phantom.read_bytes()[: phantom.stat().st_size * 2 // 3])
    budget = 4 * vlm.model.config.image_seq_length  # 4 slabs; the demo shows the 1st, 3rd and 4th
    slabs = scan_slabs(phantom, vlm.model.config.image_seq_length, budget)  # the default CT spec
    question = "Which organs does this scan show?"
    want = expected(vlm, [], question, slabs)
    with demo_page(vlm, height=900, volume_tokens=budget) as page:
        upload = page.locator("#upload input[type=file]")
        upload.set_input_files(phantom)
        captions = page.locator("#slabs .caption-label")
        expect(captions).to_have_text(["slab 1 of 4", "slab 3 of 4", "slab 4 of 4"], timeout=30_000)
        expect(page.locator("#slabs img")).to_have_count(3)
        expect(page.locator("#preview")).to_be_hidden()
        page.wait_for_function(
            "() => [...document.querySelectorAll('#slabs img')].every(im => im.complete && im.naturalWidth)"
        )
        shown = [page.locator("#slabs img").nth(i).evaluate("im => im.naturalWidth") for i in range(3)]
        assert shown == [slabs[0].width] * 3  # the slabs at the size the model is given them
        srcs = "() => [...document.querySelectorAll('#slabs img')].map(im => im.src).join(' ')"
        phantom_srcs = page.evaluate(srcs)
        bot = page.locator("#chat [data-testid=bot]")
        page.locator("#question textarea").fill(question)
        page.locator("#question textarea").press("Enter")
        expect(bot).to_have_count(1, timeout=60_000)
        wait_for_answer(bot.last, want)
        page.screenshot(path=tmp_path / "ui-scan.png", full_page=True)

        # a zipped DICOM series (5 slices: 4 slabs) starts a new conversation
        page.locator("#upload button[aria-label='Clear']").first.click()
        upload.set_input_files(tmp_path / "ct5n.zip")
        expect(bot).to_have_count(0, timeout=30_000)
        page.wait_for_function(  # the series' slabs in place of the phantom's (both first slabs are air)
            f"old => {{ const now = ({srcs})(); return now.split(' ').length === 3 && now !== old; }}",
            arg=phantom_srcs,
            timeout=30_000,
        )
        expect(captions).to_have_text(["slab 1 of 4", "slab 3 of 4", "slab 4 of 4"])

        # a truncated scan: the reason on the page, no crash
        page.locator("#upload button[aria-label='Clear']").first.click()
        upload.set_input_files(cut)
        expect(page.get_by_test_id("toast-body")).to_contain_text("truncated", timeout=30_000)


@pytest.mark.skipif(not os.environ.get("MEDVL_DOCS_MODEL"), reason="MEDVL_DOCS_MODEL not set")
def test_docs_screenshot(tmp_path):
    """The documentation's screenshot: a trained model (MEDVL_DOCS_MODEL) answering in the demo about
    a real image (MEDVL_DOCS_IMAGE); the answer on the page must be the model's own."""
    from playwright.sync_api import expect

    vlm = load(os.environ["MEDVL_DOCS_MODEL"])
    image = os.environ["MEDVL_DOCS_IMAGE"]
    question = os.environ.get("MEDVL_DOCS_QUESTION", "What imaging modality was used to acquire this image?")
    size = vlm.model.config.vision_config.image_size
    want = expected(vlm, [], question, [read_image(image, vlm.preprocessing, size=size)])
    with demo_page(vlm) as page:
        page.locator("#upload input[type=file]").set_input_files(image)
        expect(page.locator("#preview img")).to_be_visible(timeout=30_000)
        page.locator("#question textarea").fill(question)
        page.locator("#question textarea").press("Enter")
        bot = page.locator("#chat [data-testid=bot]")
        expect(bot).to_have_count(1, timeout=60_000)
        wait_for_answer(bot.last, want)
        page.screenshot(path=tmp_path / "shot.png", full_page=True)
    shutil.copy(tmp_path / "shot.png", Path(__file__).resolve().parent.parent / "docs" / "ui-screenshot.png")
    print(f"{image}: {question!r} -> {want!r}")
