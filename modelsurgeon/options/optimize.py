"""``optimize``'s own options and the pass list they select: every exact pass by default (plugins
included), in the order their declarations give."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import BadInput
from .base import Options, comma_list, escape, option


@dataclass
class OptimizeOptions(Options):
    passes: tuple[str, ...] = option((), metavar="LIST", convert=comma_list,
                                     help="Comma-separated passes to run (default: every exact pass; 'cleanup': "
                                          "all of the ONNX graph clean-up).")
    skip: tuple[str, ...] = option((), metavar="LIST", convert=comma_list,
                                   help="Comma-separated passes not to run ('cleanup': all of the ONNX graph clean-up).")
    verify_each: bool = option(False, help="Check parity after each pass, not only at the end.")

    def selected(self) -> list[str]:
        """The passes to run, in optimize's order; unknown or inexact names refused."""
        from .. import passes as registry

        exact = registry.exact_passes()
        known = {s.name for s in registry.specs()}
        groups = {s.group for s in registry.specs() if s.group}

        def expand(names: tuple[str, ...]) -> list[str]:  # a group's name stands for its passes
            return [q for n in names for q in (registry.in_group(n) if n in groups else [n])]

        wanted, skip = expand(self.passes), expand(self.skip)
        for name in wanted:
            if name not in exact:
                self.fail("{passes}: " + escape(f"{name!r} is not an exact pass (choose from {', '.join(exact)})"),
                          passes=...)
        for name in skip:
            if name not in known:
                self.fail("{skip}: " + escape(f"unknown pass {name!r}"), skip=...)
        chosen = [p for p in exact if (not wanted or p in wanted) and p not in skip]
        if not chosen:
            raise BadInput("no pass left to run")
        return chosen


def commandless() -> dict[str, type]:
    """The options classes of the exact passes with no command of their own: optimize takes
    their options (such a pass is configured only there)."""
    from .. import passes as registry

    return {s.name: s.options for s in registry.specs()
            if s.exact and s.cli is None and s.options.option_fields()}
