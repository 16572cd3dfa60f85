"""PNG of the memory breakdown per device (needs matplotlib: pip install 'tokenmill[plot]')."""

from __future__ import annotations

from pathlib import Path

from tokenmill.planner.plan import Plan

GiB = 1024**3
_SEGMENTS = (
    ("weights", "#4c72b0"),
    ("kv_cache", "#55a868"),
    ("activations", "#dd8452"),
    ("overhead", "#8172b3"),
)


def plot_memory(p: Plan, path: str | Path) -> Path:
    """Write a horizontal stacked bar per device (GiB per device at its tensor-parallel size), with the
    usable budget and the device capacity marked. Returns the path written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ValueError("--plot needs matplotlib: pip install 'tokenmill[plot]'") from exc
    rows = [g for g in p.gpus if g.memory is not None]
    if not rows:
        raise ValueError("nothing to plot: no device has a memory breakdown")
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--plot writes a PNG: give a path ending in .png, got {str(path)!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(rows) + 2.4))
    labels = [
        f"{g.gpu.name} x{g.tensor_parallel_size or '?'}" + ("" if g.status == "fits" else f" ({g.status})")
        for g in rows
    ]
    y = list(range(len(rows)))
    left = [0.0] * len(rows)
    for name, color in _SEGMENTS:
        widths = [getattr(g.memory, name) / GiB for g in rows]
        ax.barh(y, widths, left=left, color=color, label=name.replace("_", " "))
        left = [a + b for a, b in zip(left, widths)]
    for i, g in enumerate(rows):
        assert g.memory is not None
        ax.plot([g.memory.budget / GiB] * 2, [i - 0.4, i + 0.4], color="black", linewidth=1.5)
        ax.plot([g.memory.capacity / GiB] * 2, [i - 0.4, i + 0.4], color="grey", linestyle=":", linewidth=1.2)
    ax.plot([], [], color="black", label="usable (gpu_memory_utilization)")
    ax.plot([], [], color="grey", linestyle=":", label="device memory")
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlabel("GiB per device")
    w = p.workload
    ax.set_title(
        f"{p.arch.name} {p.precision}, KV {p.kv_dtype}: {w.concurrency} x {w.context_len} tokens", fontsize=11
    )
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
