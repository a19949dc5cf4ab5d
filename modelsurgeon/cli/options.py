"""The commands, built from declarations: one per registered pass that has a command (plugins
included) plus ``optimize``, each with the run options (:class:`RunOptions`), its own options
dataclass and the general ones, as ``Annotated`` parameters in ``--help`` panels. Commands are
built when first asked for, so ``--version`` reads no plugin and imports no pass."""

from __future__ import annotations

import inspect
from typing import Any, Callable

import typer
from typer.core import TyperCommand, TyperGroup


class _ReadableHelp:
    """Typer writes a required argument as ``{input}`` in the usage line and a type label after
    every option (``<bool>`` after a flag, ``<list[str]>``): the usage line shows ``INPUT``,
    flags show nothing, other options their metavar (``SHAPE``, ``DIR``...)."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = super().collect_usage_pieces(ctx)  # type: ignore[misc]
        return [p[1:-1] if p.startswith("{") and p.endswith("}") else p for p in pieces]

    def get_params(self, ctx: Any) -> list:
        params = super().get_params(ctx)  # type: ignore[misc]
        for p in params:
            if getattr(p, "is_flag", False) and p.metavar is None:
                p.metavar = ""
        return params


class Command(_ReadableHelp, TyperCommand):
    pass


class Group(_ReadableHelp, TyperGroup):
    """The root command: its subcommands are made from the registry on first need."""

    def _populate(self) -> None:
        if getattr(self, "_populated", False):
            return
        self._populated = True
        from ..passes import registry

        registry.report_problem = _warning  # a plugin that cannot be loaded: one line, and on we go
        for name, cmd in commands():
            self.commands.setdefault(name, cmd)

    def list_commands(self, ctx: Any) -> list[str]:
        self._populate()
        return super().list_commands(ctx)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        self._populate()
        return super().get_command(ctx, cmd_name)


Job = Callable[[dict], tuple[list[str], dict, dict]]
"""parsed own values -> (passes, pass options by name, RunOptions plumbing: repeat, verify_each)"""


def command(name: str, help: str, own: list[type], job: Job) -> Any:
    """A click command ``name`` with the run options, the options of ``own`` and the general
    ones; ``job`` turns the parsed values of ``own`` into what the pipeline runs."""

    from ..options.run import RunOptions
    from . import params

    def fn(**kwargs: Any) -> None:
        from .run import execute

        opts = params.build(RunOptions, kwargs)
        passes, pass_options, plumbing = job(kwargs)
        opts.pass_options.update(pass_options)
        for key, value in plumbing.items():
            setattr(opts, key, value)
        execute(name, passes, opts, params.build(params.GeneralOptions, kwargs))

    fn.__signature__ = inspect.Signature(params.parameters(RunOptions, *own, params.GeneralOptions))  # type: ignore[attr-defined]
    fn.__name__ = name.replace("-", "_")
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command(name, help=help, cls=Command)(fn)
    return typer.main.get_command(app)


def pass_command(spec: Any) -> Any:
    from . import params

    def job(parsed: dict) -> tuple[list[str], dict, dict]:
        return [spec.name], {spec.name: params.build(spec.options, parsed)}, {}

    return command(spec.cli, spec.help, [spec.options], job)


OPTIMIZE_HELP = ("Run every exact pass (focus-to-conv, fold-fusion, fold-bn; on ONNX also the graph clean-up; "
                 "installed plugins' exact passes) until nothing changes; verify once.\n\nExample (after python examples/build.py): modelsurgeon "
                 "optimize examples/checkpoints/yolov5s-focus.pt --trust-pickle --code-path examples/yolo "
                 "-s 1,3,64,64 -o yolov5s.onnx")


def optimize_command() -> Any:
    from ..options.optimize import OptimizeOptions, commandless
    from . import params

    others = commandless()

    def job(parsed: dict) -> tuple[list[str], dict, dict]:
        own = params.build(OptimizeOptions, parsed)
        chosen = own.selected()
        options = {n: params.build(cls, parsed) for n, cls in others.items() if n in chosen}
        return chosen, options, {"repeat": True, "verify_each": own.verify_each}

    return command("optimize", OPTIMIZE_HELP, [OptimizeOptions, *others.values()], job)


def commands() -> list[tuple[str, Any]]:
    """Every command: the passes' (registration order), then optimize and compare."""
    from ..passes import registry

    out = []
    for spec in registry.specs():
        if spec.cli is None:
            continue
        try:
            out.append((spec.cli, pass_command(spec)))
        except Exception as e:  # a plugin's options that cannot be parameters: left out, said once
            registry.report_problem(f"pass {spec.name!r}: no command ({type(e).__name__}: {e})")
    out.append(("optimize", optimize_command()))
    from .compare import compare_command

    out.append(("compare", compare_command()))
    return out


def _warning(message: str) -> None:
    import sys

    sys.stderr.write(f"modelsurgeon: warning: {' '.join(message.split())}\n")
    sys.stderr.flush()
