"""The chat page at `/`, opened in a real headless Chromium (Debian's, driven by Playwright): a message sent from the
page streams back the model's reasoning apart from its answer, with the token counts and tokens/s."""

import shutil

import pytest
from playwright.sync_api import sync_playwright

from nanoseek.serve import create_app, running

from .conftest import memorised

QUESTION = "What is 1+1?"
REPLY = "<think>1+1 is 2</think>The answer is 2."
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]  # no connections beyond 127.0.0.1


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (scripts/test.sh installs Debian's where it can)")
def test_the_page_streams_reasoning_apart_from_the_answer_with_token_counts(tok, tmp_path):
    prompt = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    with running(create_app(memorised(tok, [(prompt, REPLY)], 150), tok, "tiny-chat")) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 900, "height": 700})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        page.wait_for_function("document.getElementById('model').textContent === 'tiny-chat'")
        page.fill("#temperature", "0")
        page.fill("#input", QUESTION)
        page.press("#input", "Enter")
        page.wait_for_selector(".stats:has-text('tokens/s')", timeout=30_000)
        page.screenshot(path=str(tmp_path / "chat.png"))
        assert page.inner_text(".user") == QUESTION
        assert page.inner_text(".assistant .reasoning") == "1+1 is 2"
        assert page.inner_text(".assistant > span") == "The answer is 2."
        stats = page.inner_text(".stats")
        browser.close()
    assert "generated tokens" in stats and "tokens/s" in stats and not errors, (stats, errors)
