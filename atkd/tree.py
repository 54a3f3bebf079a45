"""The ability tree: load, match ability paths, list leaves, save (ARCHITECTURE.md §3).

Initial trees are nested JSON objects whose keys are ability names and whose leaves are `0`,
`null` or `{}` (any non-object value is a leaf; a list of strings is a list of leaves). The file
holds either one top-level key (the domain) or the level-1 nodes directly. The reference
implementation's `"综合得分"` ("overall score") keys are ignored on load.

Scored trees (student_data_analyzer.py output) are one object per node:
`{"name", "path", "n", "correct", "accuracy", "smoothed_accuracy", "weakness", "children"}`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .errors import InputError
from .io import iter_jsonl, read_json, write_json

ABILITY_PATH_SEP = " > "  # how paths are written in messages
SCORE_KEYS = {"综合得分"}  # bookkeeping keys of the reference implementation, not abilities
DEFAULT_ROOT = "root"
STAT_FIELDS = ("n", "correct", "accuracy", "smoothed_accuracy", "weakness")


@dataclass
class Node:
    """One ability; `path` runs from the root's name down to this node's name."""

    name: str
    path: tuple[str, ...]
    children: list["Node"] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    @property
    def is_leaf(self) -> bool:
        return not self.children

    def child(self, name: str) -> "Node | None":
        for c in self.children:
            if c.name == name:
                return c
        return None

    def walk(self) -> Iterator["Node"]:
        """This node and all below it, parents before children."""
        yield self
        for c in self.children:
            yield from c.walk()


class AbilityTree:
    """A rooted tree of abilities; the root is the domain."""

    def __init__(self, root: Node):
        self.root = root

    @property
    def domain(self) -> str:
        return self.root.name

    def nodes(self) -> list[Node]:
        return list(self.root.walk())

    def leaves(self) -> list[Node]:
        return [n for n in self.root.walk() if n.is_leaf and n is not self.root]

    def node(self, path: tuple[str, ...] | list[str]) -> Node | None:
        """The node a full path (starting at the root) names, or None."""
        path = tuple(path)
        if not path or path[0] != self.root.name:
            return None
        node = self.root
        for name in path[1:]:
            node = node.child(name)
            if node is None:
                return None
        return node

    def match(self, ability_path: list[str]) -> Node | None:
        """The node an ability path names; the path may start at the root or just below it."""
        parts = [p.strip() for p in ability_path]
        if parts and parts[0] == self.root.name:
            found = self.node(parts)
            if found is not None:
                return found
        return self.node([self.root.name, *parts])

    def mismatch(self, ability_path: list[str]) -> str | None:
        """Why an ability path names no node: the first name not found, where, and the closest names
        there (difflib); None when it matches."""
        if self.match(ability_path) is not None:
            return None
        parts = [p.strip() for p in ability_path]
        below_root = parts[1:] if parts and parts[0] == self.root.name else parts
        node = self.root
        for depth, name in enumerate(below_root):
            found = node.child(name)
            if found is None:
                if node.is_leaf:
                    return f"{ABILITY_PATH_SEP.join(node.path)} is a leaf: there is no {name!r} below it"
                names = [c.name for c in node.children]
                # The first name may be a misspelt domain.
                domain = [self.root.name] if depth == 0 and parts[0] != self.root.name else []
                close = difflib.get_close_matches(name, names + domain, n=3, cutoff=0.5)
                close = [f"{c} (the domain)" if c in domain else c for c in close]
                where = ("among the level-1 abilities" if node is self.root
                         else f"under {ABILITY_PATH_SEP.join(node.path)}")
                if close:
                    return f"{name!r} is not {where}; closest: {', '.join(close)}"
                more = ", ..." if len(names) > 10 else ""
                return f"{name!r} is not {where}, which are: {', '.join(names[:10])}{more}"
            node = found
        return "the path is empty"

    # ----------------------------------------------------------------- nested (initial) form
    def to_nested(self) -> dict:
        def nested(node: Node):
            return {c.name: nested(c) for c in node.children} if node.children else {}
        return {self.root.name: nested(self.root)}

    def save_nested(self, path: str | Path) -> None:
        write_json(path, self.to_nested())

    # ----------------------------------------------------------------- scored form
    def to_scored(self) -> dict:
        def scored(node: Node) -> dict:
            out = {"name": node.name, "path": list(node.path)}
            out.update({k: node.stats.get(k) for k in STAT_FIELDS})
            out.update({k: v for k, v in node.stats.items() if k not in STAT_FIELDS})
            out["children"] = [scored(c) for c in node.children]
            return out
        return scored(self.root)

    def save_scored(self, path: str | Path) -> None:
        write_json(path, self.to_scored())


def _nested_children(value, parent: Node, source: Path) -> None:
    if isinstance(value, dict):
        items = [(k, v) for k, v in value.items() if k not in SCORE_KEYS]
    elif isinstance(value, list):
        if not all(isinstance(v, str) for v in value):
            raise InputError(source, f"under {' > '.join(parent.path)}: a list must hold ability names (strings)")
        items = [(v, None) for v in value]
    else:
        return  # 0, null, a number: a leaf
    for name, sub in items:
        name = str(name).strip()
        if not name:
            raise InputError(source, f"under {' > '.join(parent.path)}: empty ability name")
        if parent.child(name) is not None:
            raise InputError(source, f"under {' > '.join(parent.path)}: duplicate ability {name!r}")
        child = Node(name=name, path=parent.path + (name,))
        parent.children.append(child)
        _nested_children(sub, child, source)


def single_top_key(obj) -> str | None:
    """The domain a nested tree file names: its one top-level key when that key holds an object;
    None when the file lists the level-1 abilities directly."""
    keys = [k for k in obj if k not in SCORE_KEYS] if isinstance(obj, dict) else []
    return keys[0] if len(keys) == 1 and isinstance(obj[keys[0]], dict) else None


def tree_from_nested(obj, domain: str | None = None, source: str | Path = "<tree>") -> AbilityTree:
    """Build a tree from the nested form; `domain` names the root when the file has none.

    A file with one top key that is not `domain` becomes the one level-1 ability under `domain`
    (main.py refuses such a file instead: see `atkd.workflow.check_tree_domain`).
    """
    source = Path(source)
    if not isinstance(obj, dict) or not [k for k in obj if k not in SCORE_KEYS]:
        raise InputError(source, "an ability tree must be a non-empty JSON object of ability names")
    keys = [k for k in obj if k not in SCORE_KEYS]
    single_root = single_top_key(obj) is not None and (domain is None or keys[0] == domain)
    if single_root:
        root = Node(name=keys[0].strip(), path=(keys[0].strip(),))
        _nested_children(obj[keys[0]], root, source)
    else:
        name = (domain or DEFAULT_ROOT).strip()
        root = Node(name=name, path=(name,))
        _nested_children(obj, root, source)
    if not root.children:
        raise InputError(source, "the ability tree has no abilities below the domain")
    return AbilityTree(root)


def tree_from_scored(obj, source: str | Path = "<tree>") -> AbilityTree:
    """Build a tree (with per-node stats) from the scored form."""
    def build(d, parent_path: tuple[str, ...]) -> Node:
        if not isinstance(d, dict) or "name" not in d or "children" not in d:
            raise InputError(source, f"under {' > '.join(parent_path) or 'the top'}: a scored node needs \"name\" and \"children\"")
        path = parent_path + (str(d["name"]),)
        stats = {k: v for k, v in d.items() if k not in ("name", "path", "children")}
        node = Node(name=str(d["name"]), path=path, stats=stats)
        node.children = [build(c, path) for c in d["children"]]
        return node
    return AbilityTree(build(obj, ()))


def is_scored(obj) -> bool:
    return isinstance(obj, dict) and "name" in obj and isinstance(obj.get("children"), list)


def check_paths_file(tree: AbilityTree, paths_file: str | Path, tree_file: str | Path) -> None:
    """Every ability path of `paths_file` names a node of `tree`, else an `InputError` at its line
    naming the closest names (`AbilityTree.mismatch`)."""
    for lineno, obj in iter_jsonl(paths_file):
        path = obj.get("ability_path")
        why = tree.mismatch(path) if isinstance(path, list) else '"ability_path" must be a list of names'
        if why:
            raise InputError(paths_file, f"ability path {ABILITY_PATH_SEP.join(map(str, path or []))!r} names no node "
                                         f"of the ability tree ({tree_file}, domain {tree.domain!r}): {why}", lineno)


def load_tree(path: str | Path, domain: str | None = None) -> AbilityTree:
    """Load an initial (nested) or scored tree file, whichever it is."""
    obj = read_json(path)
    if is_scored(obj):
        return tree_from_scored(obj, source=path)
    return tree_from_nested(obj, domain=domain, source=path)
