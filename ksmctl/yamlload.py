"""YAML loading that remembers where every key came from, for error messages.

Both policies and the daemon config are validated by pydantic models; this module
turns pydantic's errors into one message per problem that names the file, the line,
the key path, the bad value and what is allowed.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple, Type, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

Path_ = Tuple[Any, ...]
M = TypeVar("M", bound=BaseModel)


class YamlProblem(Exception):
    """Raised with a finished message; callers wrap it in their own error type."""


class _Loader(yaml.SafeLoader):
    def compose_node(self, parent: Any, index: Any) -> Any:
        # Aliases would let a small file expand into a huge one (billion laughs), and
        # nothing in a policy needs them.
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not supported",
                                              self.peek_event().start_mark)
        return super().compose_node(parent, index)




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
        raise YamlProblem("%s: not valid YAML: %s" % (where, e.problem or e.context)) from None
    except yaml.YAMLError as e:
        raise YamlProblem("%s: not valid YAML: %s" % (filename, e)) from None
    except RecursionError:
        raise YamlProblem("%s: nested too deeply" % filename) from None
    return node


def _construct(node: Any, path: Path_, lines: Dict[Path_, int], filename: str, scalars: Any) -> Any:
    """Plain Python data from a node, recording each path's line; rejects duplicate keys
    (YAML would silently keep the last one) and aliases (no billion-laughs)."""
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: Dict[Any, Any] = {}
        for knode, vnode in node.value:
            if not isinstance(knode, yaml.ScalarNode):
                raise YamlProblem("%s:%d: %s: keys must be plain words"
                                  % (filename, knode.start_mark.line + 1, _fmt(path) or "top level"))
            key = knode.value
            if knode.tag == "tag:yaml.org,2002:merge" or key == "<<":
                raise YamlProblem("%s:%d: merge keys (<<) are not supported" % (filename, knode.start_mark.line + 1))
            if key in out:
                raise YamlProblem("%s:%d: %s: key %r appears twice" % (
                    filename, knode.start_mark.line + 1, _fmt(path) or "top level", key))
            out[key] = _construct(vnode, path + (key,), lines, filename, scalars)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(v, path + (i,), lines, filename, scalars) for i, v in enumerate(node.value)]
    # Scalars: let PyYAML's safe resolver decide int/float/bool/null/str.
    try:
        return scalars.construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError, OverflowError) as e:
        raise YamlProblem("%s:%d: %s: bad value %r (%s)" % (
            filename, node.start_mark.line + 1, _fmt(path), node.value, e)) from None


def load_yaml(text: str, filename: str) -> Tuple[Any, Dict[Path_, int]]:
    """Parse text into data plus {key path: line number}. Empty text gives None."""
    node = _compose(text, filename)
    if node is None:
        return None, {}
    lines: Dict[Path_, int] = {}
    scalars = _Loader("")  # PyYAML's resolver for scalar types (int, float, bool, null, str)
    try:
        return _construct(node, (), lines, filename, scalars), lines
    finally:
        scalars.dispose()


def _fmt(path: Path_) -> str:
    out = ""
    for p in path:
        out += "[%d]" % p if isinstance(p, int) else ("." if out else "") + str(p)
    return out


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


def describe_errors(e: ValidationError, model: Type[BaseModel], filename: str,
                    lines: Dict[Path_, int]) -> str:
    """One line per problem: 'file:line: key.path: problem'."""
    out = []
    for err in e.errors():
        # pydantic names validator functions in some locations; they are not keys.
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        line = None
        for i in range(len(loc), -1, -1):
            if loc[:i] in lines:
                line = lines[loc[:i]]
                break
        where = "%s:%d" % (filename, line) if line else filename
        key = _fmt(loc) or "top level"
        typ = err["type"]
        if typ == "extra_forbidden" and loc:
            allowed = _allowed_keys(model, loc[:-1])
            msg = "unknown key %r%s" % (loc[-1], "; allowed here: " + ", ".join(allowed) if allowed else "")
            key = _fmt(loc[:-1]) or "top level"
        elif typ == "missing" and loc:
            msg = "required key %r is missing" % loc[-1]
            key = _fmt(loc[:-1]) or "top level"
        else:
            value = err.get("input")
            shown = repr(value) if not isinstance(value, (dict, list)) else None
            msg = _clean_msg(err["msg"])
            if shown is not None and len(shown) < 60:
                msg = "%s is not allowed: %s" % (shown, msg)
        out.append("%s: %s: %s" % (where, key, msg))
    # pydantic can report the same problem twice through different union branches.
    seen = set()
    uniq = [m for m in out if not (m in seen or seen.add(m))]
    return "\n".join(uniq)


def validate(model: Type[M], data: Any, filename: str, lines: Dict[Path_, int]) -> M:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise YamlProblem("%s:%d: the top level must be a mapping of keys to values, found %s"
                          % (filename, lines.get((), 1), type(data).__name__))
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise YamlProblem(describe_errors(e, model, filename, lines)) from None
