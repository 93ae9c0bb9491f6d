"""Griffe extension: show options fields in the signatures of the functions that take them.

``extract``, ``plan`` and ``features_for`` receive the extract options through ``**overrides``
(``train_head``, ``sweep`` and ``finetune`` theirs likewise); at run time
``featurecache.extraction.options.expands_options`` (``featurecache._runtime.options.expands``)
rewrites their reported signature to list every field as a keyword-only parameter (so
``help(fc.extract)`` shows them). Griffe reads the source without importing it, so it sees only
``**overrides`` and warns that the documented parameters are not in the signature. This
extension does statically what the decorator does at run time: for each function decorated
with ``expands_options(...)`` (ExtractOptions) or ``expands(SomeOptions, ...)`` it inserts the
named fields (all of them when none are named) before ``**overrides``, with the field's
annotation and its default (the first argument of the ``option(...)`` / ``_option(...)`` call
that declares the field, which is also what the class's own signature shows);
``expands_options(*KEYED_FIELDS)`` lists the fields not declared ``keyed=False``.
"""

from __future__ import annotations

import ast
from typing import Any

import griffe

_DECORATORS = ("expands_options", "expands")
#: The options classes, by name -> their path in the package.
_CLASSES = {
    "ExtractOptions": "extraction.options.ExtractOptions",
    "TrainOptions": "training.options.TrainOptions",
    "SweepOptions": "training.options.SweepOptions",
    "FinetuneOptions": "finetuning.options.FinetuneOptions",
}


def _functions(obj: Any) -> Any:
    for member in obj.members.values():
        if member.is_alias:
            continue
        if member.is_function:
            yield member
        elif member.is_module or member.is_class:
            yield from _functions(member)


def _default(value: Any) -> Any:
    """The default of a field declared ``_option(default, flag, help, ...)`` (or a plain default)."""
    if isinstance(value, griffe.ExprCall) and str(value.function) in ("_option", "option") and value.arguments:
        return value.arguments[0]
    return value


class ExpandOptions(griffe.Extension):
    """Insert the ExtractOptions fields into the signatures of ``@expands_options`` functions."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.name != "featurecache":
            return
        fields_of = {name: self._fields(pkg[path]) for name, path in _CLASSES.items()}
        for func in _functions(pkg):
            for decorator in func.decorators:
                text = str(decorator.value)
                if text.split("(", 1)[0].rsplit(".", 1)[-1] not in _DECORATORS:
                    continue
                call = ast.parse(text, mode="eval").body
                args = list(getattr(call, "args", []))
                if text.startswith("expands_options"):
                    fields = fields_of["ExtractOptions"]
                elif args and getattr(args[0], "id", "") in fields_of:
                    fields = fields_of[args.pop(0).id]
                else:
                    raise ValueError(f"{func.path}: cannot read {text} statically; teach {__file__} this form")
                names = []
                for arg in args:
                    if isinstance(arg, ast.Starred) and getattr(arg.value, "id", "") == "KEYED_FIELDS":
                        names += [n for n, a in fields.items() if "keyed=False" not in str(a.value).replace(" ", "")]
                    elif isinstance(arg, ast.Constant):
                        names.append(arg.value)
                    else:
                        raise ValueError(f"{func.path}: cannot read {text} statically; teach {__file__} this form")
                names = names or list(fields)
                self._expand(func, [(n, fields[n]) for n in names])

    @staticmethod
    def _fields(options: Any) -> dict[str, Any]:
        """An options dataclass's fields (its annotated class attributes), their defaults shown as plain values."""
        fields = {n: a for n, a in options.members.items() if a.is_attribute and a.annotation is not None}
        # The class's own signature shows each field's default, not the option(...) call declaring it.
        for attr in fields.values():
            attr.value = _default(attr.value)
        init = options.members.get("__init__")
        if init is not None and init.is_function:
            for param in init.parameters:
                if param.name in fields:
                    param.default = fields[param.name].value
        return fields

    @staticmethod
    def _expand(func: griffe.Function, fields: list[tuple[str, Any]]) -> None:
        params = list(func.parameters)
        at = next(
            i
            for i, p in enumerate(params)
            if p.kind in (griffe.ParameterKind.keyword_only, griffe.ParameterKind.var_keyword)
        )
        taken = {p.name for p in params}
        extra = []
        for name, attr in fields:
            if name in taken:
                continue
            default = _default(attr.value)
            extra.append(
                griffe.Parameter(
                    name, annotation=attr.annotation, kind=griffe.ParameterKind.keyword_only, default=default
                )
            )
        func.parameters = griffe.Parameters(*params[:at], *extra, *params[at:])
