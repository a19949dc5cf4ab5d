"""The ``compare`` report on the terminal: one table of outputs, one of layers (``--layers``)."""

from __future__ import annotations

from typing import Any

from .render import MAX_ROWS, _e


def _g(v: Any) -> str:
    return "-" if v is None else f"{v:.3g}"


def render_comparison(c: Any, console: Any) -> None:
    from rich.table import Table

    console.print(f"[bold]modelsurgeon compare[/bold]  {_e(c.a)}  vs  {_e(c.b)}")
    if c.inputs:
        console.print("inputs: " + "; ".join(f"{_e(i['name'])} {'x'.join(map(str, i['shape']))} {i['dtype']}"
                                             for i in c.inputs)
                      + f"   sets: {c.parity.trials}   atol {c.parity.atol:.3g}  rtol {c.parity.rtol:.3g}")
    t = Table(title="outputs", title_justify="left")
    for col in ("output", "max abs", "max rel", "mean abs", "median abs", "p99 abs", "cosine", "min rtol", ""):
        t.add_column(col, justify="left" if col in ("output", "") else "right")
    for o, (na, nb) in zip(c.outputs, c.pairs):
        s = o.stats or {}
        name = na if na == nb else f"{na} ~ {nb}"
        t.add_row(_e(name), _g(o.max_abs), _g(o.max_rel), _g(s.get("mean_abs")), _g(s.get("median_abs")),
                  _g(s.get("p99_abs")), _g(s.get("cosine")), _g(s.get("min_rtol")),
                  ("[green]ok[/green]" if o.passed else "[red]differs[/red]") + (f" {_e(o.note)}" if o.note else ""))
    console.print(t)
    if c.layers is not None:
        lt = Table(title="layers (execution order)", title_justify="left")
        for col in ("A", "B", "max abs", "max rel", ""):
            lt.add_column(col, justify="right" if col.startswith("max") else "left")
        fd = c.first_divergence
        rows = c.layers
        if fd is not None and len(rows) > MAX_ROWS:  # keep the first divergence in view
            i = rows.index(fd)
            rows = rows[max(0, i - MAX_ROWS // 2): max(0, i - MAX_ROWS // 2) + MAX_ROWS]
        for p in rows[:MAX_ROWS]:
            a = p.a + (f" → {p.a_output}" if p.a_output else "")
            b = p.b + (f" → {p.b_output}" if p.b_output else "")
            mark = "-" if p.passed is None else "[green]ok[/green]" if p.passed else "[red]differs[/red]"
            lt.add_row(_e(a), _e(b), _g(p.max_abs), _g(p.max_rel), mark + (" ← first" if p is fd else ""))
        console.print(lt)
        if len(c.layers) > MAX_ROWS:
            console.print(f"[dim]{len(c.layers)} paired layers; --json lists all[/dim]")
        if fd is not None:
            console.print(f"first divergence: {_e(fd.a)} (A) / {_e(fd.b)} (B): max abs {fd.max_abs:.3g}, "
                          f"max rel {fd.max_rel:.3g}")
    for n in c.notes:
        console.print(f"[dim]note: {_e(n)}[/dim]")
    console.print("[green]the models agree[/green]" if c.passed else f"[red]the models differ[/red] ({_e(c.worst())})")
