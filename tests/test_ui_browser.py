"""The page in a real headless browser (Debian's Chromium, driven by Playwright), the whole way:
upload the examples (a broken file first), train a tiny model and watch the plot grow, stop and
resume, convert, chat with both GGUFs, download the GGUF.

Screenshots of each step go to <the test's tmp dir>/screenshots/.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="Playwright not installed: pip install 'donkeytune[test]'")

from uiserver import running  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FACTS = ROOT / "examples" / "facts"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium() -> str | None:
    """Debian's Chromium (apt-get install chromium); Playwright's own download is not used."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


def test_the_whole_job_in_a_browser(tmp_path, tiny_model):
    exe = chromium()
    if exe is None:
        pytest.skip("no Chromium here: apt-get install chromium (make check does it as root)")
    shots = tmp_path / "screenshots"
    shots.mkdir()
    root = tmp_path / "project"
    root.mkdir()
    broken = tmp_path / "upload" / "train.jsonl"
    broken.parent.mkdir()
    lines = (FACTS / "train.jsonl").read_text().splitlines()
    broken.write_text("\n".join([lines[0], '{"messages": [{"role": "user", "content": "Hi"}]', *lines[1:3]]) + "\n")

    with running(root, model=str(tiny_model("llama"))) as (url, _app), sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=exe, headless=True, args=FLAGS,
            viewport={"width": 1200, "height": 900})
        try:
            page = context.new_page()
            page.set_default_timeout(120_000)
            page.goto(url)
            expect = sync_api.expect
            expect.set_options(timeout=120_000)

            started = time.perf_counter()

            def shot(name, section):
                page.locator(section).screenshot(path=str(shots / name))
                print(f"{time.perf_counter() - started:6.1f}s  {name}")

            # 1. data: a broken file is located and not saved; then the examples
            page.set_input_files("#train-file", str(broken))
            expect(page.locator("#upload-errors")).to_contain_text("not saved")
            expect(page.locator("#data-result")).to_contain_text("train.jsonl:2")
            expect(page.locator("#message")).to_contain_text("has errors")
            shot("01-data-error.png", "#data")
            for name in ("train", "valid", "questions"):
                page.set_input_files(f"#{name}-file", str(FACTS / f"{name}.jsonl"))
                expect(page.locator("#message")).to_contain_text("saved as")
            expect(page.locator("#data-summary")).to_contain_text("160 train")
            expect(page.locator("#data-summary")).to_contain_text("held-out questions")
            page.click("#stats")
            expect(page.locator("#stats-result")).to_contain_text("tokens per example")
            shot("02-data-ok.png", "#data")

            # 2. model and recipe (ITERS so large that the run only ends by a stop: any speed)
            for field, value in {"iters": 5000, "batch_size": 2, "lr": 0.001, "num_layers": -1,
                                 "steps_per_report": 1, "steps_per_eval": 4, "val_batches": 2,
                                 "save_every": 1000}.items():
                page.fill(f"#f-{field}", str(value))
            page.click("#recipe")
            expect(page.locator("#recipe-table")).to_contain_text("ITERS")
            shot("03-recipe.png", "#model")

            # 3. train and watch the plot grow; stop; resume, it grows on; stop again
            plot = page.locator("#plot")
            status = page.locator("#job-status")

            def points():
                return int(plot.get_attribute("data-train-points"))

            def grows_past(n):
                page.wait_for_function(
                    f"Number(document.getElementById('plot').dataset.trainPoints) > {n}")

            page.click("#train-start")
            grows_past(0)
            first = points()
            grows_past(first)  # the page updated the plot by itself
            expect(page.locator("#progress")).to_contain_text("tokens/s")
            expect(page.locator("#progress")).to_contain_text("ETA")
            assert int(plot.get_attribute("data-val-points")) >= 1
            shot("04-training.png", "#train")
            page.click("#train-stop")
            expect(status).to_have_attribute("data-state", "stopped")
            expect(status).to_contain_text("of 5000; Resume continues exactly there")
            expect(page.locator("#diagnosis")).to_contain_text("Diagnosis")
            shot("05-stopped.png", "#train")
            stopped_at = points()
            page.click("#train-resume")
            expect(page.locator("#log")).to_contain_text(f"Resuming at iteration {stopped_at}")
            grows_past(stopped_at)
            shot("06-resumed.png", "#train")
            page.click("#train-stop")
            expect(status).to_have_attribute("data-state", "stopped")

            # 4. convert, chat with both GGUFs
            page.select_option("#quantize", "Q8_0")
            page.click("#convert-start")
            expect(status).to_have_attribute("data-kind", "convert")
            expect(status).to_have_attribute("data-state", "finished")
            expect(page.locator("a.download")).to_have_count(3)  # f16, Q8_0, Modelfile
            page.fill("#prompt", "Where is the lighthouse of Brindlewick?")
            page.click("#ask")
            expect(page.locator("#message")).to_contain_text("both answered")
            expect(page.locator("#chat-base .turn")).to_have_count(2)
            expect(page.locator("#chat-finetuned .turn")).to_have_count(2)
            expect(page.locator("#tuned-name")).to_contain_text("Q8_0.gguf")
            shot("07-chat.png", "#convert")

            # 5. take it away: the GGUF link downloads the file
            link = page.locator("a.download", has_text="Q8_0.gguf")
            href = link.get_attribute("href")
            got = page.request.get(url + href)
            gguf = next((root / "output" / "gguf").glob("*-Q8_0.gguf"))
            assert got.status == 200 and len(got.body()) == gguf.stat().st_size
            assert got.body()[:4] == b"GGUF"
            expect(page.locator("#commands")).to_contain_text("ollama create")
            shot("08-take-away.png", "#takeaway")
            page.screenshot(path=str(shots / "09-whole-page.png"), full_page=True)
        finally:
            context.close()
    print(f"screenshots: {shots}")
