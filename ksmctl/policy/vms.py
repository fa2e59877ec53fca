"""The policy's `vms:` section: which running guests may have their RAM merged.

Rules select guests by libvirt name (glob), UUID, title or description (globs), or the
attributes of a <ksmctl:guest/> element in the domain's metadata (settable with
`virsh metadata`, see METADATA_NS); the first rule that matches decides, `default` decides
for the rest, and no default leaves those guests as their domain XML and QEMU command line
set them. `trust_domain` names the metadata attribute that tells which tenant a guest
belongs to; with `isolation: per_domain` only one trust domain may merge at a time.
"""
from __future__ import annotations

import enum
import fnmatch
import re
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ksmctl.yamlload import NoBoolNumbers

# The namespace of ksmctl's element in a domain's <metadata>:
#   virsh metadata DOM --uri METADATA_NS --key ksmctl --set '<guest tenant="a" merge="deny"/>'
METADATA_NS = "https://ksmctl.dev/xmlns/guest/1"
METADATA_KEY = "ksmctl"
_ATTR = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")


class _Model(NoBoolNumbers):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MergeMode(str, enum.Enum):
    """What a rule says about a guest's RAM: may merge, or must share no page."""

    allow = "allow"
    deny = "deny"


class Isolation(str, enum.Enum):
    none = "none"
    per_domain = "per_domain"   # merge only within one trust domain at a time


class OnMixed(str, enum.Enum):
    """What per_domain isolation does when guests of several trust domains could merge."""

    deny_others = "deny_others"  # deny every guest outside the largest domain
    stop_ksm = "stop_ksm"        # run=0: nothing new merges (merged pages stay merged)


@dataclass(frozen=True)
class GuestIdentity:
    """What a selector can look at, from libvirt (name, UUID, XML title, description,
    and the attributes of ksmctl's metadata element)."""

    uuid: str
    name: str
    title: str = ""
    description: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)


class Selector(_Model):
    """All given fields must match (globs, case-sensitive); at least one is required."""

    name: Optional[str] = None
    uuid: Optional[str] = None
    title: Optional[str] = None
    description: Optional[str] = None
    metadata: Dict[str, str] = Field(default_factory=dict)

    @field_validator("uuid")
    @classmethod
    def _uuid(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return None
        try:
            return str(uuidlib.UUID(v))
        except ValueError:
            raise ValueError("%r is not a UUID (e.g. 8f5b8e36-3bb4-4c65-9f0e-2c1c2b7e0a11)" % v) from None

    @field_validator("metadata")
    @classmethod
    def _attrs(cls, v: Dict[str, str]) -> Dict[str, str]:
        for k in v:
            if not _ATTR.match(k):
                raise ValueError("metadata key %r is not an XML attribute name" % k)
        return v

    @model_validator(mode="after")
    def _not_empty(self) -> "Selector":
        if not (self.name or self.uuid or self.title or self.description or self.metadata):
            raise ValueError("a match needs at least one of name, uuid, title, description, metadata")
        return self

    def matches(self, g: GuestIdentity) -> bool:
        def glob(pattern: Optional[str], value: str) -> bool:
            return pattern is None or fnmatch.fnmatchcase(value, pattern)
        return (glob(self.name, g.name) and (self.uuid is None or self.uuid == g.uuid.lower())
                and glob(self.title, g.title) and glob(self.description, g.description)
                and all(k in g.metadata and fnmatch.fnmatchcase(g.metadata[k], p)
                        for k, p in self.metadata.items()))


class VmRule(_Model):
    match: Selector
    merge: MergeMode


class VmsSection(_Model):
    rules: List[VmRule] = Field(default_factory=list, max_length=1000)
    default: Optional[MergeMode] = None        # None: leave unmatched guests as configured
    trust_domain: Optional[str] = None         # a metadata attribute naming the guest's tenant
    isolation: Isolation = Isolation.none
    on_mixed: OnMixed = OnMixed.deny_others

    @field_validator("trust_domain")
    @classmethod
    def _attr(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not _ATTR.match(v):
            raise ValueError("trust_domain %r is not an XML attribute name" % v)
        return v

    @model_validator(mode="after")
    def _isolation_needs_domain(self) -> "VmsSection":
        if self.isolation is Isolation.per_domain and self.trust_domain is None:
            raise ValueError("isolation: per_domain needs trust_domain (the metadata attribute naming a guest's "
                             "tenant)")
        return self

    def rule_for(self, g: GuestIdentity) -> Tuple[Optional[MergeMode], str]:
        """(wanted setting, which rule said so) by first match; (None, "") when nothing
        applies and there is no default."""
        for i, rule in enumerate(self.rules):
            if rule.match.matches(g):
                return rule.merge, "vms.rules[%d]" % i
        if self.default is not None:
            return self.default, "vms.default"
        return None, ""

    def domain_of(self, g: GuestIdentity) -> str:
        """A guest's trust domain; one without the attribute is a domain of its own."""
        if self.trust_domain is not None and g.metadata.get(self.trust_domain):
            return g.metadata[self.trust_domain]
        return "guest:" + g.uuid


def isolate(section: VmsSection, mergeable: List[GuestIdentity]) -> Tuple[List[str], bool, str]:
    """Per-domain isolation over the guests that would merge: (UUIDs to deny, stop KSM?,
    why). The largest domain keeps merging (ties: the name that sorts first)."""
    if section.isolation is not Isolation.per_domain:
        return [], False, ""
    domains: Dict[str, List[GuestIdentity]] = {}
    for g in mergeable:
        domains.setdefault(section.domain_of(g), []).append(g)
    if len(domains) <= 1:
        return [], False, ""
    keep = min(domains, key=lambda d: (-len(domains[d]), d))
    names = sorted(domains)
    if section.on_mixed is OnMixed.stop_ksm:
        return [], True, "guests of %d trust domains could merge (%s): KSM stopped" % (len(names), ", ".join(names))
    others = [g for d, gs in domains.items() if d != keep for g in gs]
    why = "guests of %d trust domains could merge (%s): only %s keeps merging" % (len(names), ", ".join(names), keep)
    return [g.uuid for g in others], False, why


def parse_metadata(xml_root: Any) -> Dict[str, str]:
    """The attributes of ksmctl's element in a domain's <metadata> (an ElementTree root)."""
    meta = xml_root.find("metadata")
    if meta is None:
        return {}
    for el in meta:
        if el.tag.startswith("{%s}" % METADATA_NS):
            return {k: v for k, v in el.attrib.items() if _ATTR.match(k)}
    return {}
