"""Human-readable report: rich tables on the terminal."""

from __future__ import annotations

from typing import Any

from . import ModelStats, Report

MAX_ROWS = 25
"""Rows per table in the terminal report; ``--json`` always lists everything."""


def _e(text: Any) -> str:
    """User-derived text (tensor and node names, shapes such as ``[batch, 16, 32, 32]``, details,
    reasons, paths) shown literally, not read as rich markup."""
    from rich.markup import escape

    return escape(str(text))


def _fmt_int(v: int | None) -> str:
    if v is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= div:
            return f"{v / div:.2f}{unit}"
    return str(v)


def _change(a: int | None, b: int | None) -> str:
    if a is None or b is None:
        return ""
    if a == b:
        return "="
    pct = f" ({(b - a) / a * 100:+.1f}%)" if a else ""
    return f"{b - a:+,}{pct}"


def render(report: Report, console: Any) -> None:
    from rich.table import Table

    head = f"[bold]modelsurgeon {report.command}[/bold]  {_e(report.input)}"
    if report.output:
        head += f" → {_e(report.output)}" + ("" if report.written else " [dim](not written)[/dim]")
    console.print(head)
    if report.inputs:
        console.print(f"inputs: {'; '.join('x'.join(map(str, s)) for s in report.inputs)}"
                      + (f"   slots: {', '.join(report.slots)}" if len(report.slots) > 1 else ""))

    if "truncate" in report.extra:
        _render_truncate(report.extra["truncate"], console)
    if report.extra.get("tensors") is not None:  # truncate --list on an ONNX model
        _render_tensors(report.extra["tensors"], console)
        return

    multi_slot = len(report.slots) > 1
    if len(report.passes) > 1:  # optimize: one section per pass, in the order they ran
        if report.extra.get("rounds"):
            console.print(f"[dim]{len(report.passes)} passes, {report.extra['rounds']} round"
                          f"{'s' if report.extra['rounds'] != 1 else ''} until nothing changed[/dim]")
        idle = [p.name for p in report.passes if not p.applied and not p.skipped and not p.notes]
        if idle:
            console.print(f"[dim]nothing to do: {', '.join(idle)}[/dim]")
        for p in report.passes:
            if p.name in idle:
                continue
            console.print(f"[bold cyan]{p.name}[/bold cyan]: {len(p.applied)} rewritten, {len(p.skipped)} skipped")
            _tables(console, p.applied, p.skipped, multi_slot, with_pass=False, indent=True)
            for n in p.notes:
                console.print(f"  [dim]note:[/dim] {_e(n)}")
    else:
        if not report.applied and not report.stopped:
            console.print("[yellow]nothing to rewrite[/yellow]")
        _tables(console, report.applied, report.skipped, multi_slot, with_pass=True)

    if report.before is not None:
        t = Table(title="Model", title_justify="left")
        t.add_column("")
        t.add_column("before", justify="right")
        t.add_column("after", justify="right")
        t.add_column("change", justify="right")
        b, a = report.before, report.after or ModelStats()
        for label, x, y in (("parameters", b.params, a.params), ("FLOPs", b.flops, a.flops),
                            ("BatchNorm", b.bn, a.bn),
                            ("modules" if report.backend == "torch" else "nodes", b.modules, a.modules),
                            ("ops per forward" if report.backend == "torch" else "", b.ops if report.backend == "torch" else None, a.ops if report.backend == "torch" else None)):
            if not label:
                continue
            t.add_row(label, _fmt_int(x), _fmt_int(y) if report.after else "-", _change(x, y) if report.after else "")
        console.print(t)

    p = report.parity
    if p is not None and p.checked and not p.outputs and not report.written:
        console.print("[red]parity not established[/red]: the rewritten model was not compared (see the error)")
    elif p is not None and p.checked:
        t = Table(title=f"Parity ({p.trials} trial{'s' if p.trials != 1 else ''}, "
                        f"pass if max|Δ| ≤ {p.atol:g} + {p.rtol:g}·max|ref|)", title_justify="left")
        t.add_column("output")
        t.add_column("max abs", justify="right")
        t.add_column("max rel", justify="right")
        noise = any(o.own_noise is not None for o in p.outputs)
        if noise:  # the model's own rounding: original vs float64, rewritten vs float64
            t.add_column("vs float64 (original / rewritten)", justify="right")
        t.add_column("")
        for o in p.outputs[:40]:
            cells = [_e(o.name), f"{o.max_abs:.3g}", f"{o.max_rel:.3g}"]
            if noise:
                cells.append("" if o.own_noise is None else f"{o.own_noise:.2g} / {o.vs_float64:.2g}")
            status = "[green]ok[/green]" if o.passed else "[red]FAIL[/red]"
            t.add_row(*cells, f"{status} {_e(o.note)}" if o.note else status)
        if len(p.outputs) > 40:
            t.add_row(f"… {len(p.outputs) - 40} more", *[""] * (len(t.columns) - 1))
        console.print(t)
    elif p is not None and not report.stopped:
        console.print(f"[yellow]parity not checked[/yellow] {_e(p.note)}")
    for n in report.notes:
        console.print(f"[dim]note:[/dim] {_e(n)}")
    for w in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {_e(w)}")
    if report.stopped:
        console.print(f"[bold]{report.stopped}:[/bold] nothing rewritten, nothing written")
    elif report.dry_run:
        console.print("[bold]dry run:[/bold] nothing written")
    elif report.written:
        console.print(f"[bold green]wrote[/bold green] {_e(report.output)}")


def _render_truncate(info: dict, console: Any) -> None:
    """The truncate section: the stage and why, its blocks, what was removed and rebuilt."""
    from rich.table import Table

    console.print(f"[bold]stage[/bold] {_e(info.get('stage_label', info.get('stage')))}: {_e(info.get('reason', ''))}")
    rows = info.get("blocks", [])
    marked = any("removed" in r for r in rows)
    t = Table(title=f"Blocks of {info.get('stage_label')} ({len(rows)})", title_justify="left")
    for col, just in (("#", "right"), ("block", "left"), ("type", "left"), ("output", "left"),
                      ("channels", "right"), ("params", "right"), ("FLOPs", "right")):
        t.add_column(col, justify=just)
    if marked:
        t.add_column("")
    for r in rows:
        shape = "x".join(map(str, r["out_shape"])) if r.get("out_shape") else "-"
        extra = [w for w in r.get("with", []) if isinstance(w, dict)]  # attached parameter-free calls
        cells = [str(r["index"]), _e(" + ".join([r["path"]] + [w["path"] for w in extra])),
                 _e(" + ".join([r["type"]] + [w["type"] for w in extra])), shape, str(r.get("out_channels") or "-"),
                 _fmt_int(r.get("params")), _fmt_int(r.get("flops"))]
        if marked:
            cells.append("[red]removed[/red]" if r.get("removed") else "[green]kept[/green]")
        t.add_row(*cells)
    console.print(t)
    if not info.get("removed"):
        return
    ch = info.get("output_channels", {})
    console.print(f"removed {len(info['removed'])} block(s) after {_e(info.get('last_kept'))}: "
                  f"{_e(', '.join(info['removed']))}; stage output {ch.get('before')} → {ch.get('after')} channels")
    head = info.get("head", {})
    layers = [l for l in head.get("layers", []) if isinstance(l, dict)]
    if layers:
        t = Table(title=f"Head ({head.get('mode')})", title_justify="left")
        for col in ("layer", "action", "before", "after"):
            t.add_column(col)
        for l in layers:
            action = "[bold red]rebuilt, re-initialised: needs fine-tuning[/bold red]" if l.get("reinitialised") else _e(l["action"])
            t.add_row(_e(l["path"]), action, _e(l.get("before", "-")), _e(l.get("after", "-")))
        console.print(t)
    elif head.get("unchanged"):
        console.print("the stage's output keeps its shape: the head is left as it is")
    elif head.get("model_output_is_stage_output"):
        console.print("the stage's output is the model's output: no head layer to repair")
    for key, label in (("params", "parameters"), ("flops", "FLOPs")):
        f = info.get(key, {})
        if f.get("after") is not None and f.get("before"):
            console.print(f"{label}: {_fmt_int(f['before'])} → {_fmt_int(f['after'])} "
                          f"([bold]{f.get('saved', 0):.1%} saved[/bold])")
    shapes = info.get("output_shapes")
    if shapes:
        fmt = lambda ss: "; ".join("x".join(map(str, s)) for s in ss) or "-"
        console.print(f"model output: {fmt(shapes.get('before', []))} → {fmt(shapes.get('after', []))}")
    if "prefix_exact" in info:
        console.print(f"kept prefix ({_e(info.get('last_kept'))}) identical to the original: "
                      + ("[green]yes, bit for bit[/green]" if info["prefix_exact"] else "[red]no[/red]"))
    if info.get("identity_note"):
        console.print(f"[dim]note:[/dim] {_e(info['identity_note'])}")


def _render_tensors(rows: list, console: Any) -> None:
    from rich.table import Table

    t = Table(title=f"Tensors ({len(rows)}): candidates for --at", title_justify="left")
    for col, kw in (("#", {"justify": "right"}), ("tensor", {"style": "green"}), ("op", {}), ("shape", {}), ("", {})):
        t.add_column(col, **kw)
    for r in rows:
        t.add_row(str(r["index"]), _e(r["name"]), _e(r["op"]), _e(r["shape"]), "output" if r.get("output") else "")
    console.print(t)


def _tables(console: Any, applied: list, skipped: list, multi_slot: bool, with_pass: bool, indent: bool = False) -> None:
    from rich.padding import Padding
    from rich.table import Table

    def show(t):
        console.print(Padding(t, (0, 0, 0, 2)) if indent else t)

    if applied:
        t = Table(title=f"Rewritten ({len(applied)})", title_justify="left", show_lines=False)
        if with_pass:
            t.add_column("pass", style="cyan", no_wrap=True)
        if multi_slot:
            t.add_column("slot")
        t.add_column("target", style="green")
        t.add_column("change")
        for a in applied[:MAX_ROWS]:
            t.add_row(*(([a.pass_name] if with_pass else []) + ([_e(a.slot or "")] if multi_slot else []) + [_e(a.target), _e(a.detail)]))
        _more(t, len(applied))
        show(t)
    if skipped:
        t = Table(title=f"Skipped ({len(skipped)})", title_justify="left")
        if with_pass:
            t.add_column("pass", style="cyan", no_wrap=True)
        if multi_slot:
            t.add_column("slot")
        t.add_column("target", style="yellow")
        t.add_column("reason")
        for s in skipped[:MAX_ROWS]:
            t.add_row(*(([s.pass_name] if with_pass else []) + ([_e(s.slot or "")] if multi_slot else []) + [_e(s.target), _e(s.reason)]))
        _more(t, len(skipped))
        show(t)


def _more(t: Any, n: int) -> None:
    if n > MAX_ROWS:
        t.add_row(*([f"… {n - MAX_ROWS} more"] + [""] * (len(t.columns) - 2) + ["(all of them with --json)"]))
