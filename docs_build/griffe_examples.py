"""A Griffe extension for the documentation site: medfunc's docstrings title their doctests
``Example:``, which Google-style parsing reads as an admonition of Markdown text; retitled
``Examples:``, they render as Python console blocks instead."""

from __future__ import annotations

import re
from typing import Any

import griffe

_TITLE = re.compile(r"^(\s*)Example:\s*$", flags=re.M)


class DoctestExamples(griffe.Extension):
    """Retitles each ``Example:`` section of a docstring ``Examples:``."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Rewrite the object's docstring before it is parsed.

        Args:
            obj: the object Griffe loaded.
            **kwargs: the other hook arguments (unused).
        """
        if obj.docstring is not None:
            obj.docstring.value = _TITLE.sub(r"\1Examples:", obj.docstring.value)
