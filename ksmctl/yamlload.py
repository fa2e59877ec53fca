"""YAML loading that remembers where every key came from, for error messages.

Both policies and the daemon config are validated by pydantic models; this module
turns pydantic's errors into one message per problem that names the file, the line,
the key path, the bad value and what is allowed.
"""
from __future__ import annotations

import math
import re
from typing import Any, Dict, Iterator, List, Tuple, Type, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError, ValidationInfo, field_validator

Path_ = Tuple[Any, ...]
M = TypeVar("M", bound=BaseModel)


def _numeric(annotation: Any) -> bool:
    """int, float, or an Optional of them: a field YAML's true/false must not fill."""
    if annotation in (int, float):
        return True
    args = set(get_args(annotation)) - {type(None)}
    return get_origin(annotation) is Union and bool(args) and args <= {int, float}


class NoBoolNumbers(BaseModel):
    """YAML's true and false are not 1 and 0, but pydantic's lax mode takes them for any
    int or float field (`cpu_budget: true` would be a budget of 1%). A base for every
    model that reads a file a person writes."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool(cls, v: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(v, bool) and field is not None and _numeric(field.annotation):
            raise ValueError("expected a number, found %s" % str(v).lower())
        return v


class YamlProblem(Exception):
    """Raised with a finished message; callers wrap it in their own error type."""


_PLAIN = "tag:ksmctl,2024:plain"  # every unquoted scalar, resolved by _plain_scalar
_STR = "tag:yaml.org,2002:str"
_DEFAULT_TAGS = {_PLAIN, _STR, "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"}


class _Loader(yaml.SafeLoader):
    """Composes nodes only; unquoted scalars are tagged _PLAIN so that _plain_scalar, not
    YAML 1.1's resolver, says what they mean."""

    yaml_implicit_resolvers = {None: [(_PLAIN, re.compile(r".*", re.S))]}  # type: ignore[dict-item]

    def compose_node(self, parent: Any, index: Any) -> Any:
        # Aliases would let a small file expand into a huge one (billion laughs), and
        # nothing in a policy needs them.
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not supported",
                                              self.peek_event().start_mark)
        node = super().compose_node(parent, index)
        if node is not None and node.tag not in _DEFAULT_TAGS:
            raise yaml.composer.ComposerError(None, None, "YAML tags (!name, !!type) are not supported; "
                                              "quote a value to make it text", node.start_mark)
        return node


# YAML 1.2's core schema, which is what people expect; the YAML 1.1 forms that would
# mean something else (PyYAML reads 1.1) are refused with how to write them instead.
_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")
_BOOL = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False}
_INT = re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$")
_FLOAT = re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$")
_OCTAL = re.compile(r"^[-+]?0[0-9]+$")
_BASED = re.compile(r"^[-+]?0(?:[xX][0-9a-fA-F_]+|[bB][01_]+|[oO][0-7_]+)$")
_SEXAGESIMAL = re.compile(r"^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$")
_UNDERSCORED = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?$")
_NONFINITE = re.compile(r"^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$")
MAX_DIGITS = 40  # no setting needs more; Python refuses > 4300 with a ValueError


def _base60(text: str) -> float:
    sign = -1 if text.startswith("-") else 1
    total = 0.0
    for part in text.lstrip("+-").replace("_", "").split(":"):
        total = total * 60 + float(part)
    return sign * total


class _BadScalar:
    """A scalar that YAML 1.1 and 1.2 read differently (or .nan/.inf), kept in the data
    until validate() knows whether the document may be quoted in messages."""

    def __init__(self, shown: str, hidden: str) -> None:
        self.shown, self.hidden = shown, hidden


def _plain_scalar(text: str) -> Any:
    """An unquoted scalar's value; a _BadScalar (saying how to write it) for forms that
    YAML 1.1 and 1.2 read differently, and for .nan/.inf, which no setting takes."""
    if _NULL.match(text):
        return None
    if text in _BOOL:
        return _BOOL[text]
    if len(text) > MAX_DIGITS and (_INT.match(text) or _FLOAT.match(text)):
        return _BadScalar("a number of more than %d digits" % MAX_DIGITS, "a number of more than %d digits"
                          % MAX_DIGITS)
    if _INT.match(text):
        return int(text)
    if _OCTAL.match(text):
        octal = " (YAML 1.1 reads it as octal: %d)" % int(text, 8) if re.match(r"^[-+]?[0-7]+$", text) else ""
        return _BadScalar("%s has a leading zero%s: write %d, or quote it ('%s') for text"
                          % (text, octal, int(text), text),
                          "a number with a leading zero (octal in YAML 1.1): write it without the "
                          "zero, or quote it for text")
    if _FLOAT.match(text):
        value = float(text)
        if math.isinf(value):
            return _BadScalar("%s is too large a number" % text, "a number too large")
        return value
    if _NONFINITE.match(text):
        return _BadScalar("%s: NaN and infinity are not allowed, write a finite number" % text,
                          "NaN and infinity are not allowed, write a finite number")
    if _BASED.match(text):
        return _BadScalar("%s: hexadecimal, octal and binary numbers are not supported: write it in "
                          "decimal (%d), or quote it for text" % (text, int(text.replace("_", ""), 0)),
                          "hexadecimal, octal and binary numbers are not supported: write it in "
                          "decimal, or quote it for text")
    if _SEXAGESIMAL.match(text):
        v = _base60(text)
        return _BadScalar("YAML 1.1 reads %s as the base-60 number %g: write it in seconds (%gs)%s, or "
                          "quote it for text" % (text, v, v, " or %s" % _minutes(v) if _minutes(v) else ""),
                          "YAML 1.1 reads n:nn as a base-60 number: write it in seconds (e.g. 90s), or "
                          "quote it for text")
    if "_" in text and _UNDERSCORED.match(text):
        return _BadScalar("%s: write the number without underscores (%s), or quote it for text"
                          % (text, text.replace("_", "")),
                          "write the number without underscores, or quote it for text")
    return text  # YAML 1.2: yes/no/on/off, dates and everything else are text


def _minutes(seconds: float) -> str:
    if seconds >= 60 and seconds == int(seconds) and int(seconds) % 60 == 0:
        return "%dm" % (seconds // 60)
    return ""


def _scalar(node: Any) -> Any:
    return _plain_scalar(node.value) if node.tag == _PLAIN else node.value


_QUOTED = re.compile(r"'([^'<]{2,}[^']*)'")


def _problem(text: Any) -> str:
    """PyYAML's problem, with any quoted text longer than one character left out: the
    file may be something else (a symlink to /etc/shadow) whose contents must not show."""
    return _QUOTED.sub("'...'", str(text))


def _compose(text: str, filename: str) -> Any:
    try:
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = "%s:%d" % (filename, mark.line + 1) if mark is not None else filename
        raise YamlProblem("%s: not valid YAML: %s" % (where, _problem(e.problem or e.context))) from None
    except yaml.YAMLError as e:
        raise YamlProblem("%s: not valid YAML: %s" % (filename, _problem(e))) from None
    except RecursionError:
        raise YamlProblem("%s: nested too deeply" % filename) from None
    return node


def _construct(node: Any, path: Path_, lines: Dict[Path_, int], filename: str) -> Any:
    """Plain Python data from a node, recording each path's line; rejects duplicate keys
    (YAML would silently keep the last one)."""
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: Dict[Any, Any] = {}
        for knode, vnode in node.value:
            if not isinstance(knode, yaml.ScalarNode):
                raise YamlProblem("%s:%d: %s: keys must be plain words"
                                  % (filename, knode.start_mark.line + 1, _fmt(path) or "top level"))
            key = knode.value
            if key == "<<":
                raise YamlProblem("%s:%d: merge keys (<<) are not supported" % (filename, knode.start_mark.line + 1))
            if key in out:
                raise YamlProblem("%s:%d: %s: key %s appears twice" % (
                    filename, knode.start_mark.line + 1, _fmt(path) or "top level", _key(key)))
            out[key] = _construct(vnode, path + (key,), lines, filename)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(v, path + (i,), lines, filename) for i, v in enumerate(node.value)]
    return _scalar(node)


def load_yaml(text: str, filename: str) -> Tuple[Any, Dict[Path_, int]]:
    """Parse text into data plus {key path: line number}. Empty text gives None."""
    node = _compose(text, filename)
    if node is None:
        return None, {}
    lines: Dict[Path_, int] = {}
    try:
        return _construct(node, (), lines, filename), lines
    except RecursionError:
        raise YamlProblem("%s: nested too deeply" % filename) from None


def _fmt(path: Path_) -> str:
    out = ""
    for p in path:
        out += "[%d]" % p if isinstance(p, int) else ("." if out else "") + str(p)
    return out


_WORD = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,39}$")


def _key(key: Any) -> str:
    """A key as messages show it: a word is quoted, anything else (a line of some other
    file, a secret) is not repeated."""
    return repr(key) if isinstance(key, str) and _WORD.match(key) else "(not shown: not a plain word)"


def _allowed_keys(model: Type[BaseModel], path: Path_) -> List[str]:
    """The keys allowed at `path` inside `model`, for 'unknown key' messages."""
    cur: Any = model
    for p in path:
        if isinstance(p, int):
            continue
        fields = getattr(cur, "model_fields", None)
        if not fields or p not in fields:
            return []
        ann = fields[p].annotation
        cur = _inner_model(ann)
        if cur is None:
            return []
    return sorted(getattr(cur, "model_fields", {}).keys())


def _inner_model(ann: Any) -> Any:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()) or ():
        m = _inner_model(arg)
        if m is not None:
            return m
    return None


def _clean_msg(msg: str) -> str:
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    return msg


_HIDDEN = "not allowed (the value is not shown: the file is not a mapping of known keys)"


def describe_errors(e: ValidationError, model: Type[BaseModel], filename: str,
                    lines: Dict[Path_, int], shaped: bool = True) -> str:
    """One line per problem: 'file:line: key.path: problem'. Values from the file are
    quoted only when `shaped` (its top level holds known keys only): a path that points
    at some other file must not get its contents printed."""
    out = []
    for err in e.errors():
        # pydantic names validator functions in some locations; they are not keys.
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        out.append("%s: %s" % (_where(filename, lines, loc), _describe(err, loc, model, shaped)))
    # pydantic can report the same problem twice through different union branches.
    seen: set = set()
    uniq = [m for m in out if not (m in seen or seen.add(m))]  # type: ignore[func-returns-value]
    return "\n".join(uniq)


def _where(filename: str, lines: Dict[Path_, int], loc: Path_) -> str:
    for i in range(len(loc), -1, -1):
        if loc[:i] in lines:
            return "%s:%d" % (filename, lines[loc[:i]])
    return filename


def _describe(err: Any, loc: Path_, model: Type[BaseModel], shaped: bool) -> str:
    typ = err["type"]
    if typ == "extra_forbidden" and loc:
        allowed = _allowed_keys(model, loc[:-1])
        return "%s: unknown key %s%s" % (_fmt(loc[:-1]) or "top level", _key(loc[-1]),
                                         "; allowed here: " + ", ".join(allowed) if allowed else "")
    if typ == "missing" and loc:
        return "%s: required key %r is missing" % (_fmt(loc[:-1]) or "top level", loc[-1])
    key = _fmt(loc) or "top level"
    if not shaped:
        return "%s: %s" % (key, _HIDDEN)
    value = err.get("input")
    shown = repr(value) if not isinstance(value, (dict, list)) else None
    msg = _clean_msg(err["msg"])
    if shown is not None and len(shown) < 60:
        msg = "%s is not allowed: %s" % (shown, msg)
    return "%s: %s" % (key, msg)


def _bad_scalars(data: Any, path: Path_) -> Iterator[Tuple[Path_, _BadScalar]]:
    if isinstance(data, _BadScalar):
        yield path, data
    elif isinstance(data, dict):
        for k, v in data.items():
            yield from _bad_scalars(v, path + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _bad_scalars(v, path + (i,))


def is_shaped(model: Type[BaseModel], data: Any) -> bool:
    """A mapping whose top-level keys are all the model's: values may be quoted."""
    return isinstance(data, dict) and all(isinstance(k, str) and k in model.model_fields for k in data)


def validate(model: Type[M], data: Any, filename: str, lines: Dict[Path_, int]) -> M:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        found = "str" if isinstance(data, _BadScalar) else type(data).__name__
        raise YamlProblem("%s:%d: the top level must be a mapping of keys to values, found %s"
                          % (filename, lines.get((), 1), found))
    shaped = is_shaped(model, data)
    bad = ["%s: %s: %s" % (_where(filename, lines, p), _fmt(p), b.shown if shaped else b.hidden)
           for p, b in _bad_scalars(data, ())]
    if bad:
        raise YamlProblem("\n".join(bad))
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise YamlProblem(describe_errors(e, model, filename, lines, shaped)) from None
