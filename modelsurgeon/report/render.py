"""Human-readable report: rich tables on the terminal."""

from __future__ import annotations

from typing import Any

from . import ModelStats, Report


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

    head = f"[bold]modelsurgeon {report.command}[/bold]  {report.input}"
    if report.output:
        head += f" → {report.output}" + ("" if report.written else " [dim](not written)[/dim]")
    console.print(head)
    if report.inputs:
        console.print(f"inputs: {'; '.join('x'.join(map(str, s)) for s in report.inputs)}"
                      + (f"   slots: {', '.join(report.slots)}" if len(report.slots) > 1 else ""))

    multi_slot = len(report.slots) > 1
    if len(report.passes) > 1:  # optimize: one section per pass, in the order they ran
        if report.extra.get("rounds"):
            console.print(f"[dim]{len(report.passes)} passes, {report.extra['rounds']} round"
                          f"{'s' if report.extra['rounds'] != 1 else ''} until nothing changed[/dim]")
        for p in report.passes:
            console.print(f"[bold cyan]{p.name}[/bold cyan]: {len(p.applied)} rewritten, {len(p.skipped)} skipped")
            _tables(console, p.applied, p.skipped, multi_slot, with_pass=False, indent=True)
            for n in p.notes:
                console.print(f"  [dim]note:[/dim] {n}")
    else:
        if not report.applied:
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
    if p is not None and p.checked:
        t = Table(title=f"Parity ({p.trials} trial{'s' if p.trials != 1 else ''}, "
                        f"pass if max|Δ| ≤ {p.atol:g} + {p.rtol:g}·max|ref|)", title_justify="left")
        t.add_column("output")
        t.add_column("max abs", justify="right")
        t.add_column("max rel", justify="right")
        t.add_column("")
        for o in p.outputs[:40]:
            t.add_row(o.name, f"{o.max_abs:.3g}", f"{o.max_rel:.3g}",
                      "[green]ok[/green]" if o.passed else f"[red]FAIL[/red] {o.note}")
        if len(p.outputs) > 40:
            t.add_row(f"… {len(p.outputs) - 40} more", "", "", "")
        console.print(t)
    elif p is not None:
        console.print(f"[yellow]parity not checked[/yellow] {p.note}")
    for n in report.notes:
        console.print(f"[dim]note:[/dim] {n}")
    for w in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")
    if report.dry_run:
        console.print("[bold]dry run:[/bold] nothing written")
    elif report.written:
        console.print(f"[bold green]wrote[/bold green] {report.output}")


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
        for a in applied:
            t.add_row(*(([a.pass_name] if with_pass else []) + ([a.slot or ""] if multi_slot else []) + [a.target, a.detail]))
        show(t)
    if skipped:
        t = Table(title=f"Skipped ({len(skipped)})", title_justify="left")
        if with_pass:
            t.add_column("pass", style="cyan", no_wrap=True)
        if multi_slot:
            t.add_column("slot")
        t.add_column("target", style="yellow")
        t.add_column("reason")
        for s in skipped:
            t.add_row(*(([s.pass_name] if with_pass else []) + ([s.slot or ""] if multi_slot else []) + [s.target, s.reason]))
        show(t)
