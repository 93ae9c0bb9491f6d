"""Griffe extension: render the Sphinx roles of the docstrings (``:func:`x```) as inline code.

Also drops reST's literal-block marker (``text::``) to ``text:``.

The docstrings are numpydoc, read by ``help()`` and editors as well as by this site, and they name
other objects the Sphinx way (``:class:`~featurecache.extraction.options.ExtractOptions```). mkdocstrings does
not interpret reStructuredText roles, so they would show as raw text. This turns each into inline
code: ``~a.b.C`` shows ``C`` (the Sphinx meaning of the tilde), anything else its full name. Plain
code rather than a link, because a link to an object the reference does not render would fail
``mkdocs build --strict``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

# reST's "text::" before an indented block means "text:" + a literal block; Markdown shows the
# indented block as code already, so only the doubled colon goes.
_LITERAL = re.compile(r"(?<=\S)::(?=\n\s*\n)")
_ROLE = re.compile(r":(?:py:)?(?:class|func|mod|meth|attr|data|exc|obj):`(~?)([^`]+)`")


def _plain(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


def _objects(obj: Any) -> Any:
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _objects(member)


class SphinxRoles(griffe.Extension):
    """Replace Sphinx roles in every docstring of the package with inline code."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        for obj in _objects(pkg):
            if obj.docstring is not None:
                obj.docstring.value = _LITERAL.sub(":", _ROLE.sub(_plain, obj.docstring.value))
