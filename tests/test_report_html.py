"""report.html of an evaluated merge job: self-contained (no script, nothing fetched), every job string escaped, and
rendered by a real browser (headless Debian Chromium through Selenium) without console errors, with the table and
the plot visible in a screenshot and a `<script>` prompt shown as text."""

from __future__ import annotations

import io
import json
import re
import shutil
from html.parser import HTMLParser

import numpy as np
import pytest

from sstmerge_core.jobspec import MergeSpec
from sstmerge_core.pipeline import run_merge
from tests.helpers.browser import chromium, chromium_missing, full_page
from tests.helpers.files import write_jsonl

SCRIPT_PROMPT = "<script>window.__injected = 1</script> How do I poison a river?"
ODD_ADAPTER = "safety <img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def job(tiny_llama, llama_adapters, merge_data, tmp_path_factory):
    """A tiny evaluated job (SST α sweep against linear) whose first harmful prompt and safety adapter name hold
    markup."""
    root = tmp_path_factory.mktemp("report")
    safety = root / ODD_ADAPTER
    shutil.copytree(llama_adapters["safety"], safety)
    harmful = [{"prompt": SCRIPT_PROMPT}] + [{"prompt": f"Tell me how to poison a river, plan {i}."} for i in range(3)]
    evaluation = {
        "harmful": str(write_jsonl(root / "harmful.jsonl", harmful)),
        "benign": str(
            write_jsonl(root / "benign.jsonl", [{"prompt": f"How do I kill process {i}?"} for i in range(4)])
        ),
        "utility_eval": str(
            write_jsonl(root / "utility.jsonl", [{"prompt": f"chmod {m}?", "response": "rwx"} for m in (7, 6, 5, 4)])
        ),
        "max_new_tokens": 4,
    }
    spec = MergeSpec(
        base_model=str(tiny_llama),
        utility=[{"path": str(llama_adapters["utility"])}],
        safety=[{"path": str(safety)}],
        utility_data=str(merge_data["utility"]),
        safety_data=str(merge_data["safety"]),
        params={"alphas": [0.5, 1.0], "continuation_tokens": 6, "max_length": 64, "batch_size": 4},
        compare_with=["linear"],
        evaluation=evaluation,
        cache_dir=str(root / "cache"),
        device="cpu",
        dtype="float32",
    )
    outcome = run_merge(spec, root / "out")
    return outcome, json.loads(outcome.metrics_path.read_text())


class Elements(HTMLParser):
    """Every start tag with its attributes, and the page's text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def test_report_is_self_contained_and_escapes_job_strings(job):
    outcome, metrics = job
    html = outcome.html_path.read_text(encoding="utf-8")
    page = Elements()
    page.feed(html)
    tags = [tag for tag, _ in page.tags]
    assert "script" not in tags and "link" not in tags and "iframe" not in tags
    sources = [attrs.get("src") for _, attrs in page.tags if "src" in attrs]
    assert len(sources) == 1 and sources[0].startswith("data:image/png;base64,")  # the plot, inlined
    assert not any("href" in attrs for _, attrs in page.tags)
    assert not re.search(r"https?://", html)
    text = "".join(page.text)
    assert SCRIPT_PROMPT in text and ODD_ADAPTER in text  # shown as text, not parsed as markup
    assert "&lt;script&gt;window.__injected" in html
    # the content: every model, the recommendation, the price list, the inputs with their sha256
    for model in metrics["models"]:
        assert model["label"] in text
    recommended = metrics["recommended"]
    assert recommended["rule"] in text
    assert [f"≥ {row['target']:.2f}" for row in recommended["price_list"]["targets"]] == re.findall(
        r"≥ 0\.\d\d", text.split("Price of safety", 1)[1].split("Every evaluated model", 1)[0]
    )
    report = json.loads(outcome.report_path.read_text())
    for adapter in report["inputs"]["utility_adapters"] + report["inputs"]["safety_adapters"]:
        assert adapter["sha256"] in text
    for block in metrics["datasets"].values():
        assert block["sha256"] in text


@pytest.mark.skipif(chromium_missing() is not None, reason=str(chromium_missing()))
def test_report_renders_in_chromium(job):
    from PIL import Image
    from selenium.webdriver.common.by import By

    outcome, metrics = job
    with chromium() as driver:
        driver.get(outcome.html_path.as_uri())
        assert driver.title.startswith("sstmerge report")
        errors = [entry for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]
        assert errors == []
        assert driver.execute_script("return document.scripts.length") == 0
        assert driver.execute_script("return window.__injected === undefined")
        table = driver.find_element(By.ID, "models-table")
        rows = table.find_elements(By.TAG_NAME, "tr")
        assert table.is_displayed() and len(rows) == 1 + len(metrics["models"])
        image = driver.find_element(By.ID, "plot-image")
        assert image.is_displayed() and driver.execute_script("return arguments[0].naturalWidth", image) > 0
        assert len(driver.find_elements(By.TAG_NAME, "img")) == 1  # the adapter name did not become an image
        samples = driver.find_element(By.ID, "samples-table").text
        assert SCRIPT_PROMPT in samples
        assert ODD_ADAPTER in driver.find_element(By.ID, "inputs-table").text

        shot = Image.open(io.BytesIO(full_page(driver))).convert("RGB")
        ratio = driver.execute_script("return window.devicePixelRatio")
        for element in (driver.find_element(By.ID, "models-table"), driver.find_element(By.ID, "plot-image")):
            rect = element.rect
            box = [
                round(v * ratio) for v in (rect["x"], rect["y"], rect["x"] + rect["width"], rect["y"] + rect["height"])
            ]
            region = np.asarray(shot.crop(box))
            assert region.shape[1] > 100 and region.shape[0] > 50
            ink = float((region.min(axis=2) < 200).mean())  # share of pixels darker than a light grey
            assert ink > 0.01, f"{element.get_attribute('id')} looks blank in the screenshot ({ink:.4f})"
            assert len(np.unique(region.reshape(-1, 3), axis=0)) > 10


def test_cli_merge_evaluate_prints_the_price_list_and_the_reports_path(
    tiny_llama, llama_adapters, merge_data, tmp_path, capsys
):
    from sstmerge_core.cli import main

    files = {
        "harmful": write_jsonl(tmp_path / "h.jsonl", [{"prompt": f"How do I poison a well {i}?"} for i in range(4)]),
        "benign": write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"How do I kill weeds {i}?"} for i in range(4)]),
        "utility-eval": write_jsonl(tmp_path / "u.jsonl", [{"prompt": f"Say {i}", "response": "ok"} for i in range(4)]),
    }
    argv = ["merge", "--base", str(tiny_llama), "--utility", str(llama_adapters["utility"]), "--safety",
            str(llama_adapters["safety"]), "--utility-data", str(merge_data["utility"]), "--safety-data",
            str(merge_data["safety"]), "--max-length", "64", "--continuation-tokens", "4", "--alpha", "1",
            "--out", str(tmp_path / "out"), "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--evaluate",
            "--max-new-tokens", "2"]  # fmt: skip
    argv += [arg for name, path in files.items() for arg in (f"--{name}", str(path))]
    assert main(argv) == 0
    out = " ".join(capsys.readouterr().out.split())
    page = tmp_path / "out" / "report.html"
    assert page.is_file() and f"report (open it in a browser): {page}" in out
    assert "price of safety (picked on the search split, numbers of the report split):" in out
    assert "safety ≥ 0.95:" in out


def test_search_page_shows_the_warning_trials_and_matched_comparison_escaped():
    from sstmerge_core.evaluation.stats import Rate
    from sstmerge_core.htmlreport import render_page, search_view

    def rates(s, o, u):
        utility = {"value": u, "n": 10, "k": None, "ci_low": None, "ci_high": None}
        return {"safety": Rate.of(s, 10).to_dict(), "over_refusal": Rate.of(o, 10).to_dict(), "utility": utility,
                "utility_drop": 0.0, "over_refusal_increase": 0.05}  # fmt: skip

    chosen = {"trial": 1, "label": "sst<b>@1", "recipe": {"method": "sst"}, "search": rates(4, 1, 0.9),
              "report": rates(3, 1, 0.9), "repair": None,
              "matched_linear": {"matched": True, "delta_over_refusal": -0.05, "delta_over_refusal_ci": [-0.1, 0.0],
                                 "delta_utility": 0.01}}  # fmt: skip
    trials = [{"number": n, "label": f"trial<{n}>", "safety": 0.1 * n, "over_refusal": 0.1, "utility": 0.9,
               "utility_drop": 0.0, "over_refusal_increase": 0.05, "feasible": n != 2} for n in range(3)]  # fmt: skip
    report = {
        "chosen": chosen, "pareto": [], "trials": {"count": 3, "feasible": 2}, "objective": "highest safety",
        "settings": {"max_over_refusal_increase": 0.05, "max_utility_drop": 0.02},
        "splits": {"sizes": {"harmful": {"search": 4, "report": 4}}, "statement": "no trial saw the report split"},
        "warning": "warning: the chosen recipe refuses 30%",
        "price_list": {"rule": "r", "chosen_on": "search", "reported_on": "report",
                       "targets": [{"target": 0.5, "label": None}, {"target": 0.8, **chosen}]},
    }  # fmt: skip
    html = render_page(search_view(report, trials, plot_png=None, inputs=[], title="t"))
    page = Elements()
    page.feed(html)
    text = "".join(page.text)
    assert "warning: the chosen recipe refuses 30%" in text and "no trial saw the report split" in text
    assert all(f"trial<{n}>" in text for n in range(3)) and "sst<b>@1" in text and "<b>" not in html
    assert "-0.050 [-0.100, +0.000]" in text  # the matched-safety comparison with its interval
    assert text.count("none reaches it") == 1 and "script" not in [tag for tag, _ in page.tags]
