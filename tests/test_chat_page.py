"""The chat page at `/`, opened in a real headless Chromium (Debian's, driven by Playwright): a message sent from the
page streams back the model's reasoning apart from its answer, with the token counts and tokens/s."""

import shutil

import pytest
import torch
from playwright.sync_api import sync_playwright

from nanoseek import ModelConfig, Transformer
from nanoseek.engine import Engine
from nanoseek.sampling import SamplingParams
from nanoseek.serve import create_app, running

QUESTION = "What is 1+1?"
REPLY = "<think>1+1 is 2</think>The answer is 2."
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]  # no connections beyond 127.0.0.1


def memorised(tok) -> Transformer:
    """A tiny model trained until its greedy reply to QUESTION is REPLY: something to show with reasoning in it."""
    prompt = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    ids = torch.tensor([prompt + tok.encode(REPLY) + [tok.eos_id]])
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, num_nextn_predict_layers=0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(model(ids).logits[0, len(prompt) - 1:-1], ids[0, len(prompt):])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert Engine(model, tok).generate([prompt], SamplingParams(max_new_tokens=40))[0].text == REPLY
    return model


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (scripts/test.sh installs Debian's where it can)")
def test_the_page_streams_reasoning_apart_from_the_answer_with_token_counts(tok, tmp_path):
    with running(create_app(memorised(tok), tok, "tiny-chat")) as url, sync_playwright() as p:
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
