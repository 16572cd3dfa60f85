"""Catalog of accelerators: memory, bandwidth, bf16 throughput and rental prices.

Memory is the capacity the driver reports to a process (``torch.cuda.mem_get_info()[1]``), in GiB, which is
a little below the marketed figure. Bandwidth and TFLOP/s are the vendors' peak numbers (dense bf16, no
sparsity). Prices are representative US per-GPU-hour list prices from hyperscalers and GPU clouds as of
``PRICE_DATE``; override them (or add devices) with a JSON/TOML file, see ``load_gpu_catalog``.
"""

from __future__ import annotations

import difflib
import json
import re
import tomllib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

PRICE_DATE = "2025-06-01"

# Stated efficiency assumptions (fraction of the roofline an optimized engine reaches):
#   decode: memory-bound steps reach ~75% of peak HBM bandwidth on datacenter GPUs (paged attention,
#           fused kernels, CUDA graphs); Apple unified memory ~65%, CPU DRAM ~50%.
#   prefill: large matmuls reach ~50% of peak dense bf16 TFLOP/s (MFU) on GPUs, 35% on Apple, 30% on CPU.
DEFAULT_EFFICIENCY = {"gpu": (0.75, 0.50), "apple": (0.65, 0.35), "cpu": (0.50, 0.30)}

# Stated assumption: the fixed time of one small collective (an all-reduce of a decode step's few KB), the
# order of magnitude NCCL's all_reduce_perf reports for small messages inside one node: a few microseconds over
# NVLink/NVSwitch or Infinity Fabric, tens over PCIe (through the host bridge). Override per device with
# collective_latency_us in a --gpu-catalog file.
DEFAULT_COLLECTIVE_LATENCY_US = {"NVLink": 8.0, "Infinity Fabric": 10.0, "PCIe": 25.0}


@dataclass(frozen=True)
class GPUSpec:
    """One accelerator (or a CPU / Apple-Silicon machine, planned the same way)."""

    name: str
    memory_gib: float  # capacity visible to a process
    bandwidth_gbps: float  # peak memory bandwidth, GB/s (10^9 bytes/s)
    bf16_tflops: float  # peak dense bf16 tensor throughput, TFLOP/s
    kind: str = "gpu"  # "gpu" | "apple" | "cpu"
    vendor: str = "NVIDIA"
    on_demand_per_hour: float | None = None  # USD per device-hour
    spot_per_hour: float | None = None  # USD per device-hour, interruptible
    price_date: str | None = PRICE_DATE
    max_usable_fraction: float = 1.0  # OS/driver cap on what one process may use (Metal: ~75% of RAM)
    bandwidth_efficiency: float | None = None  # None: DEFAULT_EFFICIENCY for the kind
    compute_efficiency: float | None = None
    max_tensor_parallel_size: int = 8  # devices in one node
    aliases: tuple[str, ...] = ()
    # The link between the devices of one node that tensor parallelism's collectives use ("NVLink 4",
    # "PCIe 4.0 x16", ...) and its peak bandwidth per device and direction in GB/s (a ring collective sends and
    # receives at once, so the per-direction figure is what it gets). None: a single-device machine.
    interconnect: str | None = None
    interconnect_gbps: float | None = None
    collective_latency_us: float | None = None  # None: DEFAULT_COLLECTIVE_LATENCY_US for the link kind

    def __post_init__(self) -> None:
        if self.kind not in DEFAULT_EFFICIENCY:
            raise ValueError(f"GPU {self.name!r}: kind must be 'gpu', 'apple' or 'cpu', got {self.kind!r}")
        for name in ("memory_gib", "bandwidth_gbps", "bf16_tflops"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"GPU {self.name!r}: {name} must be a positive number, got {value!r}")
        for name in ("bandwidth_efficiency", "compute_efficiency", "max_usable_fraction"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise ValueError(
                    f"GPU {self.name!r}: {name}={value} must be in (0, 1]: an estimate above the roofline is impossible"
                )
        if self.interconnect_gbps is not None and self.interconnect_gbps <= 0:
            raise ValueError(f"GPU {self.name!r}: interconnect_gbps must be > 0, got {self.interconnect_gbps}")
        if self.collective_latency_us is not None and self.collective_latency_us < 0:
            raise ValueError(
                f"GPU {self.name!r}: collective_latency_us must be >= 0, got {self.collective_latency_us}"
            )
        for name in ("on_demand_per_hour", "spot_per_hour"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"GPU {self.name!r}: {name} must be >= 0, got {value}")

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * 1024**3)

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return self.bandwidth_gbps * 1e9

    @property
    def flops_per_s(self) -> float:
        return self.bf16_tflops * 1e12

    @property
    def decode_efficiency(self) -> float:
        return self.bandwidth_efficiency or DEFAULT_EFFICIENCY[self.kind][0]

    @property
    def prefill_efficiency(self) -> float:
        return self.compute_efficiency or DEFAULT_EFFICIENCY[self.kind][1]

    @property
    def interconnect_bytes_per_s(self) -> float | None:
        return None if self.interconnect_gbps is None else self.interconnect_gbps * 1e9

    @property
    def collective_latency_s(self) -> float | None:
        """Fixed time of one small collective on the interconnect (None without one)."""
        if self.collective_latency_us is not None:
            return self.collective_latency_us * 1e-6
        if self.interconnect is None:
            return None
        for kind, us in DEFAULT_COLLECTIVE_LATENCY_US.items():
            if self.interconnect.startswith(kind):
                return us * 1e-6
        return None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["aliases"] = list(self.aliases)
        return d


_G = GPUSpec
GPU_CATALOG: dict[str, GPUSpec] = {
    g.name: g
    for g in (
        _G(
            "H200",
            139.8,
            4800,
            989,
            on_demand_per_hour=3.79,
            spot_per_hour=2.29,
            aliases=("H200-SXM", "H200-141GB"),
            interconnect="NVLink 4",
            interconnect_gbps=450,  # NVIDIA H200 datasheet: NVLink 900 GB/s, both directions together
        ),
        _G(
            "H100-SXM",
            79.2,
            3350,
            989,
            on_demand_per_hour=2.99,
            spot_per_hour=1.75,
            aliases=("H100", "H100-80GB"),
            interconnect="NVLink 4",
            interconnect_gbps=450,  # NVIDIA H100 datasheet (SXM5): NVLink 900 GB/s, both directions together
        ),
        # NVIDIA H100 datasheet (PCIe): PCIe Gen5 128 GB/s, both directions together (NVLink bridges of two
        # cards not assumed).
        _G("H100-PCIe", 79.2, 2000, 756, on_demand_per_hour=2.49, spot_per_hour=1.45, interconnect="PCIe 5.0 x16",
           interconnect_gbps=64),
        _G(
            "A100-80GB",
            79.15,
            2039,
            312,
            on_demand_per_hour=1.79,
            spot_per_hour=0.99,
            aliases=("A100", "A100-SXM-80GB"),
            interconnect="NVLink 3",
            interconnect_gbps=300,  # NVIDIA A100 datasheet (SXM4): NVLink 600 GB/s, both directions together
        ),
        # The cloud A100-40GB (8-GPU SXM4 nodes): NVLink 600 GB/s both directions, as the 80 GB part.
        _G("A100-40GB", 39.39, 1555, 312, on_demand_per_hour=1.29, spot_per_hour=0.69, interconnect="NVLink 3",
           interconnect_gbps=300),
        # L40S, A10G, L4 and RTX 4090 have no NVLink: PCIe Gen4 x16, 64 GB/s both directions together (NVIDIA
        # datasheets); the 4090 has no peer-to-peer either, so its collectives are slower still.
        _G("L40S", 44.5, 864, 362, on_demand_per_hour=1.86, spot_per_hour=0.75, interconnect="PCIe 4.0 x16",
           interconnect_gbps=32),
        _G("A10G", 22.0, 600, 70, on_demand_per_hour=1.01, spot_per_hour=0.42, max_tensor_parallel_size=8,
           interconnect="PCIe 4.0 x16", interconnect_gbps=32),
        _G("L4", 22.0, 300, 121, on_demand_per_hour=0.80, spot_per_hour=0.33, interconnect="PCIe 4.0 x16",
           interconnect_gbps=32),
        _G("RTX-4090", 23.6, 1008, 165, on_demand_per_hour=0.69, spot_per_hour=0.35, aliases=("4090",),
           interconnect="PCIe 4.0 x16", interconnect_gbps=32),
        # AMD MI300X datasheet: 7 Infinity Fabric links of 128 GB/s (both directions), 896 GB/s peer to peer.
        _G("MI300X", 191.5, 5300, 1307, vendor="AMD", on_demand_per_hour=2.69, spot_per_hour=1.79,
           interconnect="Infinity Fabric", interconnect_gbps=448),
        _G(
            "M2-Ultra-192GB",
            192,
            800,
            27,
            kind="apple",
            vendor="Apple",
            max_usable_fraction=0.75,
            max_tensor_parallel_size=1,
            price_date=None,
            aliases=("M2-Ultra",),
        ),
        _G(
            "M3-Max-128GB",
            128,
            400,
            16,
            kind="apple",
            vendor="Apple",
            max_usable_fraction=0.75,
            max_tensor_parallel_size=1,
            price_date=None,
            aliases=("M3-Max",),
        ),
        _G(
            "M4-Max-128GB",
            128,
            546,
            18,
            kind="apple",
            vendor="Apple",
            max_usable_fraction=0.75,
            max_tensor_parallel_size=1,
            price_date=None,
            aliases=("M4-Max",),
        ),
        _G(
            "M3-Ultra-512GB",
            512,
            819,
            28,
            kind="apple",
            vendor="Apple",
            max_usable_fraction=0.75,
            max_tensor_parallel_size=1,
            price_date=None,
            aliases=("M3-Ultra",),
        ),
        _G(
            "M4-Pro-64GB",
            64,
            273,
            9,
            kind="apple",
            vendor="Apple",
            max_usable_fraction=0.75,
            max_tensor_parallel_size=1,
            price_date=None,
            aliases=("M4-Pro",),
        ),
        # A 12-channel DDR5-4800 server socket (e.g. EPYC 9004) and a 2-channel DDR5-5600 desktop.
        _G(
            "CPU-server-12ch-DDR5",
            384,
            460,
            6,
            kind="cpu",
            vendor="CPU",
            max_usable_fraction=0.9,
            max_tensor_parallel_size=1,
            price_date=None,
            aliases=("CPU", "CPU-server"),
        ),
        _G(
            "CPU-desktop-2ch-DDR5",
            64,
            89.6,
            1.5,
            kind="cpu",
            vendor="CPU",
            max_usable_fraction=0.9,
            max_tensor_parallel_size=1,
            price_date=None,
            aliases=("CPU-desktop",),
        ),
    )
}


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name.lower())


def list_gpus(catalog: dict[str, GPUSpec] | None = None) -> list[GPUSpec]:
    return list((catalog or GPU_CATALOG).values())


def get_gpu(name: str | GPUSpec, catalog: dict[str, GPUSpec] | None = None) -> GPUSpec:
    """Look up a device by name or alias, ignoring case, spaces, '-' and '_' ("h100" -> H100-SXM).

    Raises ValueError with the closest names when nothing matches.
    """
    if isinstance(name, GPUSpec):
        return name
    catalog = catalog or GPU_CATALOG
    index: dict[str, str] = {}
    for spec in catalog.values():
        for alias in spec.aliases:
            index.setdefault(_key(alias), spec.name)
    for spec in catalog.values():
        index[_key(spec.name)] = spec.name
    key = _key(name)
    if key in index:
        return catalog[index[key]]
    close = difflib.get_close_matches(key, list(index), n=4, cutoff=0.4)
    names = list(dict.fromkeys(index[c] for c in close))
    raise ValueError(
        f"unknown GPU {name!r}"
        + (f"; close matches: {', '.join(names)}" if names else "")
        + f". Known: {', '.join(catalog)}. Add your own with --gpu-catalog FILE"
    )


_SPEC_FIELDS = {f.name for f in fields(GPUSpec)}


def load_gpu_catalog(
    path: str | Path | None = None, base: dict[str, GPUSpec] | None = None
) -> dict[str, GPUSpec]:
    """The built-in catalog updated from a user file (JSON or TOML).

    The file maps device names to fields; a known name (or alias) updates only the given fields, a new name
    must give at least memory_gib, bandwidth_gbps and bf16_tflops::

        {"gpus": {"H100": {"on_demand_per_hour": 2.10, "spot_per_hour": 1.20, "price_date": "2025-09-01"},
                  "B200": {"memory_gib": 179, "bandwidth_gbps": 8000, "bf16_tflops": 2250}}}

    The top-level "gpus" key is optional.
    """
    catalog = dict(base or GPU_CATALOG)
    if path is None:
        return catalog
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"GPU catalog file {str(p)!r} does not exist")
    try:
        data = tomllib.loads(p.read_text()) if p.suffix.lower() == ".toml" else json.loads(p.read_text())
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(
            f"GPU catalog file {p} is not valid {'TOML' if p.suffix == '.toml' else 'JSON'}: {exc}"
        ) from exc
    entries = data.get("gpus", data) if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        raise ValueError(
            f'GPU catalog file {p} must map GPU names to objects, e.g. {{"gpus": {{"H100": {{...}}}}}}'
        )
    for name, values in entries.items():
        if not isinstance(values, dict):
            raise ValueError(f"GPU catalog file {p}: entry {name!r} must be an object of fields")
        unknown = set(values) - _SPEC_FIELDS
        if unknown:
            raise ValueError(
                f"GPU catalog file {p}: entry {name!r} has unknown fields {sorted(unknown)}; "
                f"valid fields: {sorted(_SPEC_FIELDS - {'name'})}"
            )
        values = {k: tuple(v) if k == "aliases" else v for k, v in values.items()}
        try:
            existing = get_gpu(name, catalog)
        except ValueError:
            existing = None
        if existing is not None:
            catalog[existing.name] = replace(existing, **values)
            continue
        missing = [f for f in ("memory_gib", "bandwidth_gbps", "bf16_tflops") if f not in values]
        if missing:
            raise ValueError(f"GPU catalog file {p}: new device {name!r} needs {', '.join(missing)}")
        values.setdefault("price_date", None)
        catalog[name] = GPUSpec(name=name, **values)
    return catalog
