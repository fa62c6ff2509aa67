"""The record every quantization benchmark here writes beside its numbers: command, date, machine, and how
busy the machine was when the run started (a run that started on a busy machine is marked -loaded).

    load = os.getloadavg()                       # first thing, before the run's own work
    ...
    record.write(args.out, "quant_kernels", load, {"results": results})
"""

import datetime
import json
import os
import platform
import sys
from pathlib import Path

LOADED = 0.5  # a 1-minute load average above this at start: something else was running


def write(out_dir: str, name: str, load: tuple[float, float, float] | None, payload: dict) -> Path:
    """bench/results-style JSON: out_dir/<name>-<date>[-loaded].json; `load` None for numbers that do not
    depend on it (quality)."""
    date = datetime.datetime.now().strftime("%Y-%m-%d")
    loaded = load is not None and load[0] > LOADED
    out = Path(out_dir) / f"{name}-{date}{'-loaded' if loaded else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or platform.platform()}"
    head = {"command": f"python {sys.argv[0]} " + " ".join(sys.argv[1:]), "date": date, "machine": machine}
    if load is not None:
        head |= {"load_average_at_start": load, "loaded": loaded}
    out.write_text(json.dumps(head | payload, indent=1))
    print(f"wrote {out}")
    return out
