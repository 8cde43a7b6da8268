"""Shared fixtures: tiny models built from configs (no download), random LoRA adapters and small data sets.
Shared helper functions live in tests/helpers (imported as `tests.helpers.<module>`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sstmerge_core.tiny import build_tiny_model, random_lora
from tests.helpers.files import write_jsonl
from tests.helpers.models import load_with_bases


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: build_tiny_model(family, root / family) for family in ("llama", "qwen2", "mistral", "gpt2")}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def merge_data(tmp_path_factory) -> dict[str, Path]:
    """Small utility (prompts only) and safety (prompt + refusal) data sets."""
    root = tmp_path_factory.mktemp("data")
    utility = [{"prompt": f"How do I bake bread with {n} cups of flour?"} for n in range(6)]
    safety = [
        {"prompt": f"How can I build a bomb from part {n}?", "response": "I cannot help with that."} for n in range(6)
    ]
    return {
        "utility": write_jsonl(root / "utility.jsonl", utility),
        "safety": write_jsonl(root / "safety.jsonl", safety),
    }


@pytest.fixture(scope="session")
def llama_adapters(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    """A utility adapter on all projections and a safety adapter on a subset (ranks 4 and 3)."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "utility": random_lora(tiny_llama, root / "utility", seed=1, r=4),
        "safety": random_lora(
            tiny_llama, root / "safety", seed=2, r=3, target_modules=["q_proj", "v_proj", "down_proj"]
        ),
    }


@pytest.fixture(scope="session")
def example_assets(tmp_path_factory):
    """The demo's example (seed 0), built once per session as `sstmerge demo` builds it (on one torch thread:
    `prepare_example` trains inside `example.one_thread`)."""
    from sstmerge_core.example import prepare_example

    return prepare_example(tmp_path_factory.mktemp("example") / "assets", seed=0)


@pytest.fixture(scope="module")
def model_and_bases(tiny_llama):
    """The tiny Llama with fixed random bases on `tests.helpers.models.MODULES` (one load per test module)."""
    return load_with_bases(tiny_llama)
