"""Helpers shared by the tests (import them as `tests.helpers.<module>`; pyproject's pytest `pythonpath` puts the
repository root on sys.path):

- `contracts`: valid metrics.json documents and job summaries built by hand;
- `files`: the data and adapter files tests write (JSONL rows, raw safetensors bytes);
- `models`: the tiny-model module names and the per-module bases that the Fisher tests project onto;
- `processes`: stopping the subprocesses (and their process groups) that the service tests start.
"""
