"""RSS of a process tree's tritonserver and python stubs over time, as CSV (for long soaks).

    python -m tests.helpers.rss_sampler ROOT_PID OUT.csv [interval_s]   # until ROOT_PID exits
    python -m tests.helpers.rss_sampler plot OUT.csv OUT.png

Columns: t_s, then one per process: `tritonserver` or the stub's Triton instance name (MiB).
"""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def tree(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += _children(p)
    return seen


def label(pid: int) -> str | None:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    exe = argv[0].decode(errors="replace")
    if exe.endswith("/tritonserver"):
        return "tritonserver"
    if exe.endswith("triton_python_backend_stub") and len(argv) > 8:
        return argv[8].decode(errors="replace")
    return None


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def plot(csv_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    t = [float(r["t_s"]) for r in rows]
    for name in [k for k in rows[0] if k != "t_s"]:
        points = [(x, float(r[name])) for x, r in zip(t, rows, strict=True) if r.get(name)]
        ax.plot([x for x, _ in points], [y for _, y in points], label=name)
    ax.set_xlabel("soak time (s)")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title("tritonserver and python stubs, RSS during the soak")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)


def main(argv: list[str]) -> None:
    if argv[0] == "plot":
        plot(Path(argv[1]), Path(argv[2]))
        return
    root, out = int(argv[0]), Path(argv[1])
    interval = float(argv[2]) if len(argv) > 2 else 5.0
    rows, names, start = [], [], time.monotonic()
    while Path(f"/proc/{root}").exists():
        row = {"t_s": round(time.monotonic() - start, 1)}
        for pid in tree(root):
            name = label(pid)
            mib = rss_mib(pid) if name else None
            if name and mib is not None:
                row[name] = round(mib, 1)
                if name not in names:
                    names.append(name)
        if len(row) > 1:
            rows.append(row)
            with out.open("w", newline="") as f:  # rewritten each sample: a cut run keeps its data
                writer = csv.DictWriter(f, ["t_s", *names])
                writer.writeheader()
                writer.writerows(rows)
        time.sleep(interval)


if __name__ == "__main__":
    main(sys.argv[1:])
