"""The chat page at `/`, driven in a real headless Chromium (Debian's chromium + chromium-driver, via Selenium).

A question typed and sent with Enter gets a streamed answer from the demo model (real weights); Chinese typed
through an input method is not sent by the Enter that picks a candidate; Stop ends the generation on the server;
HTML in a reply is shown as text. The screenshot goes to a temporary folder; with L3ZH_SCREENSHOT=PATH (the README's
picture: L3ZH_SCREENSHOT=benchmarks/results/serve_page.png) it is kept there, so a test run leaves the tree clean.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from support import serve_models
from support.serve_process import ServeProcess

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
HINT = ("headless Chromium is missing: apt-get install -y chromium chromium-driver "
        "(and fonts-noto-cjk fonts-noto-color-emoji for a legible screenshot)")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server():
    proc = ServeProcess(serve_models.demo_gguf("q8_0"), "--ctx", "1024", "--threads", "1", "--quiet")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        yield None  # each test then fails with the hint: a missing browser is not a reason to skip
        return
    os.environ["SE_AVOID_STATS"] = "true"  # selenium-manager would otherwise try the network
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,860",
                "--lang=zh-CN", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _open(browser, server):
    if browser is None:
        pytest.fail(HINT, pytrace=False)
    browser.get(server.url + "/")
    _until(lambda: browser.execute_script("return document.body.dataset.ready") == "1", 30)
    # Greedy, so the demo model's answers are the same every run.
    browser.execute_script("const t = document.getElementById('temperature'); t.value = 0;"
                           "t.dispatchEvent(new Event('input'));")
    return browser


def _until(condition, timeout_s: float, every_s: float = 0.02):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"condition not met within {timeout_s} s")


def _ask(browser, text: str | None = None) -> list[int]:
    """Send (typing `text` first, if given) with Enter; return the reply's lengths seen while it streamed."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = browser.find_element(By.ID, "input")
    count = len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
    if text is not None:
        box.send_keys(text)
    box.send_keys(Keys.ENTER)
    _until(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")) > count, 10)
    lengths = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = browser.execute_script(
            "const m = [...document.querySelectorAll('.msg.assistant')].pop();"
            "return [m.querySelector('.body').textContent.length, m.dataset.done === '1'];")
        lengths.append(state[0])
        if state[1]:
            return lengths
        time.sleep(0.01)
    raise AssertionError("the reply did not finish within 120 s")


def _last_reply(browser) -> dict:
    return browser.execute_script(
        "const m = [...document.querySelectorAll('.msg.assistant')].pop();"
        "return {text: m.querySelector('.body').textContent, stats: m.querySelector('.stats').textContent,"
        "        html: m.querySelector('.body').innerHTML};")


def test_a_question_gets_a_streamed_answer(browser, server):
    page = _open(browser, server)
    assert "demo.q8_0" in page.find_element("id", "model").text and "chatml" in page.find_element("id", "model").text
    assert page.find_element("id", "system").get_attribute("value").startswith("You are a helpful AI assistant")
    lengths = _ask(page, "What is 2 + 2? Answer briefly.")
    reply = _last_reply(page)
    assert "4" in reply["text"]
    assert "stop" in reply["stats"] and "prompt tokens" in reply["stats"]
    # Streamed: the text was on the page, growing, before the reply was finished.
    partial = {n for n in lengths[:-1] if 0 < n < lengths[-1]}
    assert len(partial) >= 2, lengths


def test_chinese_through_an_input_method_and_a_screenshot(browser, server, tmp_path):
    page = _open(browser, server)
    _ask(page, "What is the capital of France?")  # an English turn first, for the screenshot
    sent = len(page.find_elements("css selector", ".msg"))
    page.find_element("id", "input").click()
    # Compose with the input method as a pinyin user does; the Enter that picks the candidate must not send.
    page.execute_cdp_cmd("Input.imeSetComposition", {"text": "nihao", "selectionStart": 5, "selectionEnd": 5})
    page.execute_script(
        "document.getElementById('input').dispatchEvent(new KeyboardEvent('keydown',"
        " {key: 'Enter', isComposing: true, bubbles: true, cancelable: true}));")
    page.execute_cdp_cmd("Input.insertText", {"text": "你好"})
    assert len(page.find_elements("css selector", ".msg")) == sent  # nothing was sent while composing
    assert page.find_element("id", "input").get_attribute("value") == "你好"
    page.execute_cdp_cmd("Input.insertText", {"text": "，请重复这句话：你好，世界！🌍"})
    _ask(page)
    messages = page.find_elements("css selector", ".msg.user")
    assert messages[-1].find_element("css selector", ".body").text == "你好，请重复这句话：你好，世界！🌍"
    reply = _last_reply(page)
    assert reply["text"].strip() and "\ufffd" not in reply["text"]
    screenshot = Path(os.environ.get("L3ZH_SCREENSHOT") or tmp_path / "serve_page.png")
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    page.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 10_000


def test_model_output_is_never_parsed_as_html(browser, server):
    page = _open(browser, server)
    rendered = page.execute_script(
        "const box = document.createElement('div');"
        "box.append(renderMarkdown('<img src=x onerror=\"window.pwned=1\"> **bold** `<b>code</b>`\\n\\n'"
        " + '- [ok](https://example.com)\\n- [bad](javascript:window.pwned=1)\\n\\n```\\n<script>x</script>\\n```'));"
        "document.body.append(box);"
        "return {html: box.innerHTML, img: box.querySelectorAll('img,script,b').length,"
        "        links: [...box.querySelectorAll('a')].map(a => a.href)};")
    assert rendered["img"] == 0
    assert "<strong>bold</strong>" in rendered["html"] and "&lt;img src=x" in rendered["html"]
    assert "<code>&lt;b&gt;code&lt;/b&gt;</code>" in rendered["html"]
    assert rendered["links"] == ["https://example.com/"]
    # A real reply that repeats HTML: shown as text, no element made from it.
    page.find_element("id", "reset").click()
    _ask(page, 'Repeat exactly this text: <img src=x onerror="window.pwned=1"> <b>hi</b>')
    assert page.execute_script("return document.querySelectorAll('#log img, #log b').length") == 0
    time.sleep(0.2)
    assert page.execute_script("return window.pwned === undefined")


def test_stop_ends_the_generation_on_the_server(browser, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    page = _open(browser, server)
    page.find_element("id", "reset").click()
    before = server.health()
    max_tokens = page.find_element("id", "max_tokens")
    max_tokens.clear()
    max_tokens.send_keys("600")
    page.find_element("id", "input").send_keys("Write a very long essay about the history of tea in China.",
                                               Keys.ENTER)
    _until(lambda: page.execute_script(
        "const m = document.querySelector('.msg.assistant .body'); return m && m.textContent.length > 20"), 60)
    page.find_element(By.ID, "stop").click()
    _until(lambda: page.execute_script("return document.querySelector('.msg.assistant').dataset.done === '1'"), 10)
    assert "stopped" in _last_reply(page)["stats"]
    after = _until(lambda: (lambda h: h if h["slots_busy"] == 0 else None)(server.health()), 10)
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["generated_tokens"] - before["generated_tokens"] < 300
