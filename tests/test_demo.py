"""ddlm-demo: the page in a real headless Chromium writes what ddlm-generate writes; bad requests and other
models are refused while the server keeps serving; it listens on 127.0.0.1."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason="Gradio is in the dev extra")

from samplers.cli.page import DemoModels, canvas_html, make_handler  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("DDLM_TEST_ARTIFACTS", REPO / "test-artifacts"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def test_other_models_and_bad_values_are_refused_in_one_line(model_dir):
    models = DemoModels([str(model_dir)])
    run = make_handler(models)
    for model, steps, sampler, expected in (("/etc/passwd", 4, "ancestral", "is not one this server was started with"),
                                            (str(model_dir), 0, "ancestral", "steps must be a whole number >= 1"),
                                            (str(model_dir), 4, "nope", "unknown sampler 'nope'")):
        (out,) = list(run(model, "HAMLET:", "", sampler, steps, 8, 1.0, 0))
        assert out[2].startswith("error: ") and expected in out[2], out
    assert "/etc/passwd" not in models._loaded  # refused before any file was opened


def test_the_canvas_marks_masked_fixed_and_new_tokens():
    class Tok:
        def decode(self, ids):
            return {1: "a<", 2: "b"}[ids[0]]

    page = canvas_html([1, 9, 2], Tok(), 9, [True, False, False], newest={2})
    assert page.count('class="masked"') == 1 and '<span class="fixed">a&lt;</span>' in page
    assert '<span class="new">b</span>' in page


def _listening_addresses(port):
    """Local addresses of the TCP sockets listening on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if int(hex_port, 16) == port and state == "0A":  # LISTEN
                found.add(address)
    return found


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(model_dir):
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    process = subprocess.Popen([sys.executable, "-m", "samplers.cli.demo", str(model_dir), "--port", str(port)],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"ddlm-demo exited: {process.stdout.read()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    else:
        process.kill()
        raise AssertionError("ddlm-demo did not start listening within 120 s")
    yield port
    process.terminate()
    process.wait(timeout=30)


def test_the_page_writes_what_ddlm_generate_writes(server, model_dir, capsys):
    if CHROMIUM is None:
        if os.environ.get("DDLM_REQUIRE_BROWSER"):
            pytest.fail("DDLM_REQUIRE_BROWSER is set but no chromium is on PATH (apt-get install chromium)")
        pytest.skip("no chromium on PATH: apt-get install chromium (CI installs it and requires this test)")
    from playwright.sync_api import sync_playwright

    from samplers.cli.generate import main as generate_main

    port = server
    assert _listening_addresses(port) == {"0100007F"}  # 127.0.0.1 only
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_FLAGS)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(f"http://127.0.0.1:{port}/")

        def generate(prompt, steps, sampler="ancestral"):
            page.locator("#prompt textarea").fill(prompt)
            page.locator("#steps input").fill(str(steps))
            page.locator("#length input").fill("12")
            page.locator("#delay input").fill("0")
            page.locator("#sampler input").fill(sampler)
            page.locator("#sampler input").press("Enter")
            page.locator("#generate").click()
            page.wait_for_function("() => { const s = document.querySelector('#status textarea');"
                                   " return s && /^(done|error)/.test(s.value); }", timeout=60000)
            status = page.locator("#status textarea").input_value()
            page.evaluate("document.querySelector('#status textarea').value = ''")  # the next wait starts fresh
            return status, page.locator("#text textarea").input_value()

        status, _ = generate("HAMLET:", 0)
        assert status.startswith("error: steps must be a whole number >= 1"), status
        status, _ = generate("HAMLET:", 4, sampler="nope")
        assert status.startswith("error: unknown sampler 'nope'"), status
        status, text = generate("HAMLET:", 6)  # the server kept serving
        assert status.startswith("done: ") and "network calls" in status, status
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "demo.png"), full_page=True)
        browser.close()
    assert (ARTIFACTS / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert generate_main(["--model", str(model_dir), "--prompt", "HAMLET:", "--length", "12", "--sampling-steps", "6",
                          "--sampler", "ancestral", "--temperature", "1.0", "--seed", "0", "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)["samples"][0]["text"]
    assert text == expected
