"""Loads policy files: YAML -> validated Policy, or a PolicyError naming file, line,
key path, bad value and what is allowed. Shipped policies are found by name."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Set, Union

from ksmctl.errors import PolicyError
from ksmctl.yamlload import YamlProblem, load_yaml, validate
from ksmctl.policy.model import Policy

MAX_POLICY_BYTES = 1024 * 1024


@dataclass(frozen=True)
class LoadedPolicy:
    policy: Policy
    path: str
    sha256: str  # of the file's bytes: shows which exact file is active

    @property
    def short_hash(self) -> str:
        return self.sha256[:12]


SYSTEM_POLICY_DIR = Path("/etc/ksmctl/policies")


def policy_dirs() -> List[Path]:
    """Where named policies are found: the operator's (ksmctl install puts them in
    /etc/ksmctl/policies, edits included), then the package's, then the repo checkout."""
    here = Path(__file__).resolve().parent.parent
    return [SYSTEM_POLICY_DIR, here / "data" / "policies", here.parent / "policies"]


def shipped_policy_names() -> List[str]:
    names: Set[str] = set()
    for d in policy_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def resolve_policy_path(name_or_path: Union[str, Path], search: Optional[List[Path]] = None) -> Path:
    """A path as given, or a shipped policy's name ('default', 'ksmtuned')."""
    p = Path(name_or_path)
    if p.exists() or "/" in str(name_or_path) or str(name_or_path).endswith((".yaml", ".yml")):
        return p
    for d in (search or []) + policy_dirs():
        cand = d / (str(name_or_path) + ".yaml")
        if cand.exists():
            return cand
    raise PolicyError("no policy named %r; shipped policies: %s (or give a file path)"
                      % (str(name_or_path), ", ".join(shipped_policy_names()) or "none found"))


def parse_policy(text: str, filename: str = "<policy>") -> Policy:
    try:
        data, lines = load_yaml(text, filename)
        return validate(Policy, data, filename, lines)
    except YamlProblem as e:
        raise PolicyError(str(e)) from None


def load_policy(name_or_path: Union[str, Path], search: Optional[List[Path]] = None) -> LoadedPolicy:
    path = resolve_policy_path(name_or_path, search)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PolicyError("%s: no such policy file" % path) from None
    except IsADirectoryError:
        raise PolicyError("%s: is a directory, expected a policy YAML file" % path) from None
    except OSError as e:
        raise PolicyError("%s: cannot read: %s" % (path, e.strerror or e)) from None
    if len(raw) > MAX_POLICY_BYTES:
        raise PolicyError("%s: %d bytes is too large for a policy (at most %d)" % (path, len(raw), MAX_POLICY_BYTES))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PolicyError("%s: not UTF-8 text (byte %d)" % (path, e.start)) from None
    policy = parse_policy(text, str(path))
    return LoadedPolicy(policy=policy, path=str(path), sha256=hashlib.sha256(raw).hexdigest())


def json_schema() -> str:
    """The JSON Schema of the policy format (shipped as ksmctl/schema/policy.schema.json)."""
    schema = Policy.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "ksmctl policy"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"
