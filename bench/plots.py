"""PNG plots of a benchmark run (matplotlib, the optional ``bench`` extra).

* ``io_gbps.png``: GB/s vs frame size per implementation (``GB/s = Hz * 2 * n^2 * 4 / 1e9``);
* ``pingpong_cdf.png``: CDF of the 64 KiB ping-pong round-trip latency per implementation;
* ``mvm_gflops.png``: MVM pipeline GFLOP/s vs n per pipeline (``GFLOP/s = Hz * 2 * n^2 / 1e9``).
"""

from __future__ import annotations

import os

from .common import Section


def write_plots(sections: list[Section], outdir: str) -> list[str]:
    """Write every plot whose section ran; return notes (files written, or why not)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["plots skipped: matplotlib is not installed (pip install -e .[bench])"]
    os.makedirs(outdir, exist_ok=True)
    by_key = {s.key: s for s in sections}
    notes = []
    for key, fn in (("io", _io), ("pingpong", _pingpong), ("mvm", _mvm)):
        if key in by_key and by_key[key].rows:
            path = fn(plt, by_key[key], outdir)
            if path:
                notes.append(f"wrote {path}")
    return notes


def _lines(plt, rows: list[dict], x: str, y: str, title: str, xlabel: str, ylabel: str,
           path: str, logy: bool = True) -> str:
    fig, ax = plt.subplots(figsize=(8, 5))
    for device in sorted({r["device"] for r in rows}):
        impls: dict[str, list[tuple[float, float]]] = {}
        for r in rows:
            if r["device"] == device:
                impls.setdefault(r["impl"], []).append((r[x], r[y]))
        for impl, pts in impls.items():
            pts.sort()
            style = "-" if "torch_shmem" in impl else "--"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o",
                    label=impl if device == "cpu" else f"{impl} [{device}]")
    ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _io(plt, sec: Section, outdir: str) -> str:
    return _lines(plt, sec.rows, "n", "gbps", "write+read round trip: GB/s vs frame size",
                  "frame side n (n x n float32)", "GB/s (2 x payload per iteration)",
                  os.path.join(outdir, "io_gbps.png"), logy=False)


def _mvm(plt, sec: Section, outdir: str) -> str:
    return _lines(plt, sec.rows, "n", "gflops", "matrix-vector pipeline: GFLOP/s vs n",
                  "n (n x n float32 matrix)", "GFLOP/s (2 n² per iteration)",
                  os.path.join(outdir, "mvm_gflops.png"))


def _pingpong(plt, sec: Section, outdir: str) -> str | None:
    cdfs = sec.extra.get("cdf_us", {})
    if not cdfs:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    for impl, q in cdfs.items():
        if not q:
            continue
        ys = [i / (len(q) - 1) for i in range(len(q))]
        ax.plot(q, ys, "-" if "torch_shmem" in impl else "--", label=impl)
    ax.set_xscale("log")
    ax.set_xlabel("round-trip latency (µs)")
    ax.set_ylabel("fraction of round trips")
    ax.set_title("cross-process ping-pong, 64 KiB request / 8 B ack: latency CDF")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(outdir, "pingpong_cdf.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
