"""Helpers shared by the benchmark scripts: project imports and TensorFlow settings (the scripts' own), the machine's
description, tables, medians."""

import os
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cli import configure_tensorflow  # noqa: E402

configure_tensorflow()
SHARED_VOLUMES = ROOT.parent / "shared" / "data" / "oasis1-mni-volumes"


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {model}, Python {platform.python_version()}"


def median(values):
    return statistics.median(values)


def print_table(headers, rows) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    print("| " + " | ".join(str(h).ljust(w) for h, w in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |")
