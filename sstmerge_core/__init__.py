"""sstmerge_core: SST-Merge and baseline merges of LoRA adapters, with safety/utility evaluation.

Importing this package is cheap (no torch); the heavy modules load on first use.
"""

from __future__ import annotations

from .api import SSTMerge, merge

__all__ = ["SSTMerge", "merge"]
