"""Defaults that more than one module (or a CLI) uses, defined once.

Import them from here rather than repeating the values: a CLI's ``--help``, the library's keyword
defaults and the re-index job then cannot drift apart.
"""

from __future__ import annotations

ENCODER = "wordllama-256"
"""The encoder used when none is named: WordLlama's Matryoshka token table (from its wheel)."""

MAX_RECORD_BYTES = 1 << 20
"""Input records larger than this are skipped and reported (1 MiB)."""

K = 10
"""The k of recall@k that calibration and recall checks use."""

TARGET_RECALL = 0.99
"""Recall@k (ties counted) against exact full-dim search that a calibrated funnel must reach."""

MIN_RECALL = 0.98
"""Re-index retrains tier 0 when its measured recall@k falls below this."""

SHORTLISTS = (100, 200, 500, 1000, 2000)
"""Tier-0 shortlist sizes tried by calibration, cheapest first."""

TIER0_CANDIDATES = 2
"""How many of the smallest tier-0 dims reaching the target calibration builds and times."""

CALIBRATION_QUERIES = 1000
"""Corpus rows searched as queries when calibrating a funnel."""

CALIBRATION_ROWS = 2_000_000
"""Calibration and recall checks run on a uniform sample of this many rows of a larger corpus."""

RECALL_QUERIES = 500
"""Corpus rows searched as queries when an incremental index update checks its recall."""

GROWTH_FACTOR = 2.0
"""Re-index retrains tier 0 once the corpus exceeds this multiple of the rows it was trained on."""

MAX_REMOVE_FRACTION = 0.1
"""A re-index refuses to remove more than this share of the rows in one run (shards gone)."""

CACHE_BYTES = 2 << 30
"""``Corpus`` holds re-rank tiers in memory while their total stays under this (2 GiB)."""

FRAGMENT_ROWS = 1 << 16
"""Text records read, tokenised and written together: one Lance fragment each (at least)."""

RETRY_ATTEMPTS = 5
"""Attempts of one object-store call, each itself retried by botocore/s3fs."""

RETRY_BASE_SECONDS = 0.25
"""First back-off delay of an object-store retry; it doubles per attempt (with jitter)."""

RETRY_MAX_SECONDS = 8.0
"""Longest back-off delay between two attempts of an object-store call."""
