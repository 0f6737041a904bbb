"""Write one benchmark's results into its own section of docs/benchmarks.md.

Each benchmark script owns the text between ``<!-- BEGIN name -->`` and
``<!-- END name -->``; running it again replaces only that section, and the
section starts with the command and the machine it was measured on.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nMeasured figures, each section written by the script named in it.\n"


def machine_description() -> str:
    """Return a one-line description of the CPU, core count, memory and Python."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {memory_gib:.0f} GiB, Python {platform.python_version()}"


def write_section(name: str, title: str, body_markdown: str) -> Path:
    """Replace (or append) the section NAME of docs/benchmarks.md with BODY_MARKDOWN."""
    script = Path(sys.argv[0]).resolve()
    module = ".".join(script.relative_to(BENCHMARKS_MD.parents[1]).with_suffix("").parts)
    command = " ".join(["-m", module, *(shlex.quote(a) for a in sys.argv[1:])])
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    section = (
        f"<!-- BEGIN {name} -->\n## {title}\n\n"
        f"- Command: `python {command}`\n- Machine: {machine_description()}\n"
        f"- Date: {stamp}{f', commit {commit}' if commit else ''}\n\n"
        f"{body_markdown.strip()}\n<!-- END {name} -->\n"
    )

    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else HEADER
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section

    BENCHMARKS_MD.parent.mkdir(parents=True, exist_ok=True)
    tmp = BENCHMARKS_MD.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(BENCHMARKS_MD)
    return BENCHMARKS_MD
