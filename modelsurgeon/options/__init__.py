"""Options declared once (:mod:`.base`) and the options every run shares (:mod:`.run`)."""

from .base import NoOptions, OptionError, OptionField, Options, comma_list, option
from .run import RunOptions

__all__ = ["NoOptions", "OptionError", "OptionField", "Options", "RunOptions", "comma_list", "option"]
