"""Bacalhau job templates (native Job format, YAML) and the job document's JSON Schema."""

from pathlib import Path

HERE = Path(__file__).resolve().parent
