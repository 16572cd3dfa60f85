"""Human-readable rendering of a Plan: a table of devices, then the details of the best (or chosen) ones."""

from __future__ import annotations

from tokenmill.planner.plan import GPUPlan, Plan

GiB = 1024**3


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} B"


def fmt_count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def fmt_money(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"${x:,.{digits}f}"


def fmt_seconds(t: float) -> str:
    if t < 1:
        return f"{t * 1000:,.0f} ms"
    if t < 600:
        return f"{t:,.1f} s"
    return f"{t / 60:,.0f} min"


def fmt_duration(t: float) -> str:
    """A short time with three significant digits, in µs below a millisecond."""
    if t < 1e-3:
        return f"{t * 1e6:.3g} µs"
    if t < 1:
        return f"{t * 1e3:.3g} ms"
    return f"{t:.3g} s"


def fmt_rate(x: float) -> str:
    """A rate with about three significant digits."""
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 1:
        return f"{x:.1f}"
    return f"{x:.3g}"


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def _header(p: Plan) -> list[str]:
    a, w = p.arch, p.workload
    if a.is_mla:
        attn = f"MLA latent {a.kv_lora_rank}+{a.qk_rope_head_dim}"
    else:
        kind = "GQA" if a.num_kv_heads < a.num_attention_heads else "MHA"
        attn = f"{kind} {a.num_attention_heads}q/{a.num_kv_heads}kv heads x {a.head_dim}"
    if a.sliding_window:
        attn += f", window {a.sliding_window} on {a.num_sliding_layers}/{a.num_layers} layers"
    params = f"{fmt_count(p.params.total)} params"
    if p.params.active != p.params.total:
        params += f" ({fmt_count(p.params.active)} active)"
    moe = f", MoE {a.num_experts} experts top-{a.num_experts_per_tok}" if a.is_moe else ""
    s = p.serving_config
    return [
        f"{a.name} ({a.model_type}{moe}): {params}, {a.num_layers} layers, {attn}",
        f"weights {p.precision}: {fmt_bytes(p.weight_bytes)} | KV cache {p.kv_dtype}: "
        f"{fmt_bytes(p.kv_bytes_per_token)}/token, {fmt_bytes(p.kv_bytes_per_sequence)}/sequence of {w.context_len}",
        f"workload: {w.concurrency} concurrent x {w.context_len} tokens ({w.resolved_input_len} in + "
        f"{w.resolved_output_len} out), {w.workload}, busy {w.utilization:.0%} | gpu_memory_utilization "
        f"{s.gpu_memory_utilization}, block_size {s.block_size}",
    ]


_COLUMNS = [
    ("GPU", "<"),
    ("TP", ">"),
    ("fit", "<"),
    ("weights", ">"),
    ("KV", ">"),
    ("act+ovh", ">"),
    ("total", ">"),
    ("usable", ">"),
    ("max seqs", ">"),
    ("max len", ">"),
    ("tok/s/GPU", ">"),
    ("$/1M out", ">"),
]


def _row(g: GPUPlan) -> list[str]:
    m = g.memory
    fit = {"fits": "yes", "partial": "partial", "no": "no"}[g.status]
    if m is None:
        return [g.gpu.name, "-", fit] + ["-"] * 9
    tps = fmt_rate(g.serving.output_tokens_per_s_per_gpu) if g.serving else "-"
    cost = fmt_money(g.cost.cost_per_1m_output_on_demand) if g.cost else "-"
    return [
        g.gpu.name,
        str(g.tensor_parallel_size or m.tensor_parallel_size),
        fit,
        _gib(m.weights),
        _gib(m.kv_cache),
        _gib(m.activations + m.overhead),
        _gib(m.total),
        _gib(m.budget),
        f"{g.max_concurrency:,}" if g.status != "no" else "0",
        f"{g.max_model_len:,}" if g.status != "no" else "0",
        tps,
        cost,
    ]


def format_table(rows: list[list[str]], columns: list[tuple[str, str]]) -> str:
    widths = [max(len(c[0]), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    lines = ["  ".join(f"{c[0]:{c[1]}{w}}" for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(f"{v:{c[1]}{w}}" for v, c, w in zip(r, columns, widths)))
    return "\n".join(lines)


def format_details(p: Plan, g: GPUPlan) -> list[str]:
    m = g.memory
    if m is None:
        return [f"{g.gpu.name} ({g.status})"]
    pp = g.pipeline_parallel_size
    stages = f", {pp} pipeline stages" if pp > 1 else ""
    out = [f"{g.gpu.name} x{m.tensor_parallel_size}{stages} ({g.status})"]
    parts = m.overhead_parts
    ovh = ", ".join(f"{k.replace('_', ' ')} {_gib(v)}" for k, v in parts.items() if v)
    where = f" (largest: stage {m.pipeline_stage}, layers {m.stage_layers[0]}-{m.stage_layers[1] - 1})" \
        if pp > 1 and m.stage_layers else ""
    out.append(
        f"  memory per device{where}: weights {_gib(m.weights)} + KV {_gib(m.kv_cache)} ({m.num_sequences} x "
        f"{m.context_len} tokens) + activations {_gib(m.activations)} + overhead {_gib(m.overhead)} ({ovh}) = "
        f"{_gib(m.total)} GiB of {_gib(m.budget)} usable ({g.gpu.memory_gib:g} GiB device)"
    )
    if g.status != "no":
        w = p.workload
        out.append(
            f"  capacity: {g.max_concurrency:,} sequences of {w.context_len} tokens; "
            f"max_model_len {g.max_model_len:,} at {min(w.concurrency, g.max_concurrency)} concurrent"
        )
    if g.serving:
        s, d = g.serving, g.serving.decode
        out.append(
            f"  decode at batch {d.batch_size}, context {d.context_len}: {fmt_rate(d.tokens_per_s)} tok/s "
            f"({fmt_rate(d.tokens_per_s_per_sequence)} tok/s per sequence, {fmt_seconds(d.step_time_s)}/step), "
            f"{d.bound}-bound; roofline {fmt_rate(d.roofline_tokens_per_s)} tok/s, efficiency "
            f"{d.bandwidth_efficiency:.0%} of bandwidth / {d.compute_efficiency:.0%} of compute"
        )
        out.append(
            f"  prefill {s.input_len} tokens: {fmt_seconds(s.ttft_s)} to first token on an idle device | "
            f"served: {fmt_rate(s.requests_per_s)} req/s, {fmt_rate(s.output_tokens_per_s)} output tok/s "
            f"({fmt_rate(s.output_tokens_per_s_per_gpu)} per device)"
        )
    out.extend(_parallel_lines(g))
    c = g.cost
    if c and (c.on_demand_per_hour is not None or c.spot_per_hour is not None):
        out.append(
            f"  cost (prices of {c.price_date or 'user file'}): on-demand {fmt_money(c.on_demand_per_hour)}/h "
            f"({fmt_money(c.on_demand_per_day)}/day) -> {fmt_money(c.cost_per_1m_output_on_demand)} per 1M output "
            f"tokens at {c.utilization:.0%} busy; spot {fmt_money(c.spot_per_hour)}/h ({fmt_money(c.spot_per_day)}/day)"
            f" -> {fmt_money(c.cost_per_1m_output_spot)}"
        )
        out.append(f"  pricing for {p.workload.workload}: {c.recommended_pricing} - {c.recommendation}")
        be = c.break_even
        if be:
            verdict = (
                f"self-hosting wins above {be.requests_per_day:,.0f} requests/day "
                f"({be.utilization:.0%} busy; capacity {be.capacity_requests_per_day:,.0f}/day)"
                if be.self_hosting_wins
                else f"the API stays cheaper: break-even needs {be.requests_per_day:,.0f} requests/day, "
                f"{be.utilization:.0%} of this deployment's capacity"
            )
            out.append(
                f"  vs API at ${be.api_price_input_per_1m:g}/${be.api_price_output_per_1m:g} per 1M in/out "
                f"(${be.api_cost_per_request:.5f}/request): {verdict}"
            )
    elif c:
        out.append(f"  cost: {c.recommendation}")
    out.extend(f"  note: {n}" for n in g.notes)
    return out


def _parallel_lines(g: GPUPlan) -> list[str]:
    """The tensor-parallel collectives and the pipeline stages of a device plan."""
    out = []
    c = g.tp_communication
    if c is not None:
        out.append(
            f"  tensor parallel x{c.tensor_parallel_size}, decode step of {c.num_tokens} tokens: "
            f"{c.num_all_reduces} all-reduces of {fmt_bytes(c.all_reduce_bytes)} + logits all-gather of "
            f"{fmt_bytes(c.all_gather_bytes)} = {fmt_bytes(c.payload_bytes)} payload; each GPU sends "
            f"{fmt_bytes(c.bytes_sent_per_gpu)} on a ring"
        )
        if c.time_s is not None and c.memory_time_s is not None:
            ratio = c.ratio_to_memory_time or 0.0
            at = f"at context {c.context_len}"
            if c.dominates_batches is None:
                when = f"it stays below the memory time at every batch {at}"
            elif c.dominates_batches[1] is None:
                when = f"it exceeds the memory time from batch {c.dominates_batches[0]:,} on {at}"
            else:
                when = f"it exceeds the memory time up to batch {c.dominates_batches[1]:,} {at}"
            out.append(
                f"    on {c.interconnect} ({c.interconnect_gbps:g} GB/s per direction): "
                f"{fmt_duration(c.time_s)} per step ({fmt_duration(c.bandwidth_time_s or 0.0)} transfer + "
                f"{fmt_duration(c.latency_time_s or 0.0)} latency) vs {fmt_duration(c.memory_time_s)} memory time: "
                f"{ratio:.0%}{', communication dominates' if c.dominates else ''}; {when}"
            )
    pipe = g.pipeline
    if pipe is not None:
        split = ", ".join(
            f"{s.layers[0]}-{s.layers[1] - 1}" + (" +embed" if s.has_embedding else "")
            + (" +head" if s.has_lm_head else "") + f" {fmt_bytes(s.weight_bytes)}"
            for s in pipe.stages
        )
        out.append(f"  pipeline x{pipe.pipeline_parallel_size}: layers per stage {split} (weights per device)")
        out.append(
            f"    between stages per rank: {fmt_bytes(pipe.decode_bytes_per_boundary)} per decode step of "
            f"{pipe.decode_tokens} tokens, {fmt_bytes(pipe.prefill_bytes_per_boundary)} per prefill step of "
            f"{pipe.prefill_tokens} tokens (hidden states + residual)"
        )
    return out


def _table(p: Plan) -> tuple[list[list[str]], list[tuple[str, str]]]:
    """The device table's rows and columns (a PP column with pipeline stages)."""
    rows, columns = [_row(g) for g in p.gpus], _COLUMNS
    if p.pipeline_parallel_size > 1:
        columns = _COLUMNS[:2] + [("PP", ">")] + _COLUMNS[2:]
        rows = [r[:2] + [str(p.pipeline_parallel_size)] + r[2:] for r in rows]
    return rows, columns


def _legend(p: Plan) -> list[str]:
    lines = [
        "memory in GiB per device; max seqs at the context length; max len for the requested concurrency; "
        f"tok/s/GPU = served output tokens; $/1M out on-demand at {p.workload.utilization:.0%} busy"
    ]
    if not any(g.status != "no" for g in p.gpus if g.gpu.kind == "gpu"):
        four_bit = p.precision in ("int4-awq", "int4-gptq") or p.precision.startswith("q")
        hint = "" if four_bit else " (or try --precision int4-awq)"
        lines.append(f"no GPU fits this workload: CPU and Apple-Silicon estimates are listed{hint}")
    return lines


def _chosen(p: Plan, details_for: list[str] | None) -> tuple[list[GPUPlan], GPUPlan | None]:
    """(the device plans to detail, the best one when it was not asked for)."""
    chosen = [g for g in p.gpus if details_for and g.gpu.name in details_for]
    best = p.best
    if best is not None and best not in chosen:
        return [*chosen, best], best
    return chosen, None


def format_plan(p: Plan, details_for: list[str] | None = None) -> str:
    """The plan as text. Details are printed for ``details_for`` device names, else for the best device."""
    lines = _header(p)
    lines.append("")
    lines.append(format_table(*_table(p)))
    lines.extend(_legend(p))
    chosen, best = _chosen(p, details_for)
    if best is not None:
        lines.append("")
        lines.append(f"best fit (lowest cost per output token): {best.gpu.name}")
    for g in chosen:
        lines.append("")
        lines.extend(format_details(p, g))
    return "\n".join(lines)


def _md(text: str) -> str:
    """Text for a Markdown table cell or list item: pipes escaped."""
    return text.replace("|", "\\|")


def format_plan_markdown(p: Plan, details_for: list[str] | None = None) -> str:
    """The plan as GitHub-flavoured Markdown (for an issue, a pull request or a design note): the header, the
    device table as a pipe table, and the details as nested lists, for the same devices as format_plan."""
    a = p.arch
    header = _header(p)
    lines = [f"### `tokenmill plan`: {_md(a.name)}", ""]
    lines.extend(f"- {_md(h)}" for h in header)
    lines.append("")
    rows, columns = _table(p)
    lines.append("| " + " | ".join(c[0] for c in columns) + " |")
    lines.append("|" + "|".join("---:" if c[1] == ">" else ":---" for c in columns) + "|")
    lines.extend("| " + " | ".join(_md(v) for v in r) + " |" for r in rows)
    lines.append("")
    lines.extend(f"_{_md(line)}_" for line in _legend(p))
    chosen, best = _chosen(p, details_for)
    for g in chosen:
        details = format_details(p, g)
        title = details[0] + (" - best fit (lowest cost per output token)" if g is best else "")
        lines.extend(["", f"#### {_md(title)}", ""])
        for line in details[1:]:
            stripped = line.lstrip(" ")
            depth = (len(line) - len(stripped)) // 2 - 1  # two spaces: a top item; four: nested under it
            lines.append("  " * max(depth, 0) + f"- {_md(stripped)}")
    return "\n".join(lines) + "\n"
