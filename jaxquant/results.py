"""Result rows as ``../shared/RESULTS.md`` describes them: every row says what ran, where, with which versions."""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
from typing import Iterable


def environment() -> dict:
    import jax
    import jaxlib

    dev = jax.devices()[0]
    device = dev.device_kind if dev.platform != "cpu" else f"cpu x{os.cpu_count()} ({platform.machine()})"
    return {"device": device, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "date": datetime.date.today().isoformat()}


def command_line() -> str:
    """The command as typed: console scripts by name, scripts as ``python path``."""
    prog = sys.argv[0]
    head = [os.path.basename(prog)] if not prog.endswith(".py") else ["python", os.path.relpath(prog)]
    return " ".join(shlex.quote(a) for a in head + sys.argv[1:])


def row(benchmark: str, **fields) -> dict:
    return {"benchmark": benchmark, "command": command_line(), **environment(), **fields}


def append_rows(path: str, rows: Iterable[dict], key: tuple = ()) -> None:
    """Adds rows to a JSON list file; an existing row with the same values for ``key`` is replaced."""
    existing = []
    if os.path.exists(path):
        with open(path) as f:
            existing = json.load(f)
    for r in rows:
        if key:
            existing = [e for e in existing if any(e.get(k) != r.get(k) for k in key)]
        existing.append(r)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(existing, f, indent=1)
    os.replace(tmp, path)


def replace_section(md_path: str, block: str, begin: str, end: str) -> None:
    """Write ``block`` (which starts with ``begin`` and ends with ``end``) into the markdown file in place of the
    text between those markers, or append it; the rest of the file (hand-written notes) is kept."""
    text = open(md_path).read() if os.path.exists(md_path) else ""
    if begin in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    with open(md_path, "w") as f:
        f.write(text)
