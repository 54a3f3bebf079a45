"""create_initial_tree.py: an initial ability tree, by asking an LLM for the children of each node, level by level.

The model is asked (prompt: `prompts.tree_level_user_text`) for the sub-abilities of every node of
one level at once (one batch or one burst of API requests per level). Replies are parsed by
`parse_names`, which accepts what chat models actually write:

- numbered lists: `1. x`, `1) x`, `1、x`, `(1) x`, `（1）x`, `1: x`, `① x`;
- Chinese-numbered lists: `一、x`, `（一）x`;
- bulleted lists: `- x`, `* x`, `• x` (also `·`, `●`, `–`);
- a JSON array of strings anywhere in the reply: `["x", "y"]`;
- otherwise one name per line, or one line separated by commas / `、` / semicolons.

Each name is cleaned: markdown (`**bold**`, `__x__`, `` `x` ``, `#` headings) is removed, and a trailing
explanation after a colon (`Cardiology: the heart...`) or a spaced dash (`Cardiology - the heart`,
`心血管——...`) is cut off. Lines that introduce the list (ending in a colon) are skipped. Names
longer than `MAX_NAME_CHARS` are sentences, not names, and are dropped.
`usable_names` then drops empty names, duplicates (case-, width- and space-insensitive) and the
names of the node itself and its ancestors.

A node that gets fewer names than asked is asked again, at most `max_retries` times, and new
names are added to what it has; after that it keeps what there is and the shortfall is logged.
Model output that cannot be parsed is data, not an error (ARCHITECTURE.md §10); only a tree with no
level-1 ability at all is a failure (`TreeBuildError`).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Callable

from .cli import OUTPUT, Check, StageConfig, at_least, setting
from .errors import StageFailed
from .lifecycle import Outputs, run_stage
from .model_source import TREE_FLAGS, LocalModel, ModelSource, Prompt, PromptBatch
from .prompts import ABILITY_SEP, tree_level_user_text
from .qparse import normalize_text
from .tree import AbilityTree, Node

log = logging.getLogger(__name__)

MAX_NAME_CHARS = 64  # a longer "name" is a sentence or run-on junk, not an ability name

_CN_NUM = "一二三四五六七八九十百零〇"
# A list marker at the start of a line; what follows it is the name.
_MARKER = re.compile(
    r"^\s*(?:#+\s*)?(?:"
    r"\d{1,3}\s*[.)、．:：）]"                    # 1.  1)  1、 1：
    r"|[(（]\s*\d{1,3}\s*[)）]"                   # (1) （1）
    r"|[\u2460-\u2473]"                            # ① .. ⑳
    r"|[" + _CN_NUM + r"]{1,3}\s*[、.．)）]"        # 一、 二．
    r"|[(（][" + _CN_NUM + r"]{1,3}[)）]"           # （一）
    r"|[-*•·●▪‣–](?=\s)"                           # - x  * x  • x (a space after: not **bold**)
    r"|[•·●▪‣]"                                    # •x
    r")\s*(.*)$")
_BOLD = re.compile(r"(\*\*|__)(.+?)\1")
_EMPHASIS = re.compile(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])")
_EXPLANATION = re.compile(r"\s*(?:[:：]|\s[-–—]\s|——|\s—|—\s).*$")
_SPLIT_ONE_LINE = re.compile(r"\s*[,，、;；]\s*")
_JUNK_CHARS = re.compile(r"[\ufffd\x00-\x08\x0b-\x1f\x7f]")  # undecodable bytes, control characters
_THINK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL)  # reasoning models' scratchpad
_QUOTES = "\"'“”‘’「」『』《》`"
_TRAILING = ".。;；,，!！?？、 "


def json_array_names(text: str) -> list[str] | None:
    """The strings of the first JSON array in `text` (e.g. inside a ```json block), or None."""
    start, end = text.find("["), text.rfind("]")
    if start < 0 or end <= start:
        return None
    try:
        value = json.loads(text[start:end + 1])
    except json.JSONDecodeError:
        return None
    if not isinstance(value, list) or not value:
        return None
    names = []
    for item in value:
        if isinstance(item, str):
            names.append(item)
        elif isinstance(item, dict) and isinstance(item.get("name"), str):
            names.append(item["name"])  # [{"name": ..., "description": ...}]
        else:
            return None
    return names


def clean_name(raw: str) -> str:
    """One ability name without markdown, quotes, trailing explanation or punctuation."""
    text = _JUNK_CHARS.sub("", raw).strip()
    text = _BOLD.sub(r"\2", text)
    text = _EMPHASIS.sub(r"\1", text)
    text = text.replace("**", "").strip()
    text = text.strip(_QUOTES).strip()
    cut = _EXPLANATION.sub("", text).strip()
    if cut:  # "Cardiology: ..." -> "Cardiology"; a line that *starts* with a colon keeps its text
        text = cut
    return text.strip(_QUOTES + " ").rstrip(_TRAILING).strip(_QUOTES + " ")


def indent_of(line: str) -> int:
    """Leading whitespace width (a tab counts 4)."""
    stripped = line.lstrip()
    return len(line[: len(line) - len(stripped)].replace("\t", "    "))


def parse_names(text: str) -> list[str]:
    """Ability names in a model's reply, in order (not yet deduplicated); [] when none."""
    text = _THINK.sub("", text or "").strip()
    if not text:
        return []
    from_json = json_array_names(text)
    if from_json is not None:
        names = [clean_name(n) for n in from_json]
        return [n for n in names if n and len(n) <= MAX_NAME_CHARS]
    # Bold around a marker ("**1. Cardiology**: ...") would hide it; "**" is never part of a name.
    lines = [ln.replace("**", "").rstrip() for ln in text.splitlines()
             if ln.strip() and not ln.strip().startswith("```")]
    marked = [(indent_of(ln), m.group(1)) for ln, m in ((ln, _MARKER.match(ln)) for ln in lines) if m]
    if marked:
        # Only the outermost list: sub-bullets under "1. Cardiology" are not its siblings.
        top = min(indent for indent, _ in marked)
        candidates = [name for indent, name in marked if indent == top]
    else:
        plain = [ln for ln in lines if not ln.rstrip().endswith((":", "："))]
        if len(plain) == 1 and _SPLIT_ONE_LINE.search(plain[0]):
            candidates = _SPLIT_ONE_LINE.split(plain[0])
        else:
            candidates = plain
    names = [clean_name(c) for c in candidates]
    return [n for n in names if n and len(n) <= MAX_NAME_CHARS]


def usable_names(names: list[str], path: tuple[str, ...], have: list[str] | None = None) -> list[str]:
    """`names` minus empties, duplicates (of each other or of `have`) and the names on `path`."""
    seen = {normalize_text(n) for n in (have or [])} | {normalize_text(p) for p in path}
    out = []
    for name in names:
        key = normalize_text(name)
        if key and key not in seen:
            seen.add(key)
            out.append(name.strip())
    return out


# --------------------------------------------------------------------------- building

class TreeBuildError(StageFailed):
    """The model gave no usable level-1 ability: there is no tree to write."""


@dataclass
class Shortfall:
    """A node that got fewer children than asked for, after all its tries."""

    path: tuple[str, ...]
    wanted: int
    got: int
    attempts: int


# ask(prompts, attempt) -> one reply per prompt; attempt 0 is the first try, 1.. the retries.
Ask = Callable[[list[str], int], list[str]]


def ask_level(ask: Ask, nodes: list[Node], n_children: int, domain: str, lang: str,
              max_retries: int) -> list[Shortfall]:
    """Give each node up to `n_children` children; retry only the nodes still short."""
    found: dict[int, list[str]] = {id(n): [] for n in nodes}
    attempts: dict[int, int] = {id(n): 0 for n in nodes}
    pending = list(nodes)
    for attempt in range(max_retries + 1):
        if not pending:
            break
        if attempt:
            log.info("retry %d/%d for %d node(s) with too few names", attempt, max_retries, len(pending))
        prompts = [tree_level_user_text(domain, n.path, n_children, lang) for n in pending]
        replies = ask(prompts, attempt)
        for node, reply in zip(pending, replies):
            attempts[id(node)] += 1
            parsed = parse_names(reply)
            new = usable_names(parsed, node.path, found[id(node)])
            found[id(node)].extend(new)
            log.debug("%s: %d names parsed, %d new", ABILITY_SEP.join(node.path), len(parsed), len(new))
        pending = [n for n in pending if len(found[id(n)]) < n_children]
    shortfalls = []
    for node in nodes:
        names = found[id(node)][:n_children]
        node.children = [Node(name=name, path=node.path + (name,)) for name in names]
        if len(names) < n_children:
            shortfalls.append(Shortfall(node.path, n_children, len(names), attempts[id(node)]))
    return shortfalls


def build_tree(ask: Ask, domain: str, nodes_per_level: list[int], lang: str,
               max_retries: int = 3) -> tuple[AbilityTree, list[Shortfall]]:
    """The tree the model describes, `nodes_per_level[i]` children per node at depth i (as far as it went)."""
    root = Node(name=domain, path=(domain,))
    frontier = [root]
    shortfalls: list[Shortfall] = []
    for level, n_children in enumerate(nodes_per_level, start=1):
        if not frontier:
            break
        log.info("level %d: asking for %d sub-abilities of each of %d node(s)", level, n_children, len(frontier))
        level_short = ask_level(ask, frontier, n_children, domain, lang, max_retries)
        for s in level_short:
            log.warning("shortfall: %s got %d of %d sub-abilities after %d attempt(s); keeping what there is",
                        ABILITY_SEP.join(s.path), s.got, s.wanted, s.attempts)
        shortfalls += level_short
        if level == 1 and not root.children:
            raise TreeBuildError(f"the model gave no usable level-1 ability for {domain!r} after "
                                 f"{max_retries + 1} attempt(s)")
        frontier = [c for n in frontier for c in n.children]
    return AbilityTree(root), shortfalls


# --------------------------------------------------------------------------- the stage

RETRY_TEMPERATURE = 0.7  # a greedy retry would repeat the same reply


@dataclass(kw_only=True)
class TreeConfig(StageConfig):
    """create_initial_tree.py: the domain's ability tree, written by an LLM.

    The five settings the seed's README names (model, domain, output folder and file, GPU) have
    no default here: create_initial_tree.py's UPPER_CASE constants are their defaults.
    """

    model_path: str = TREE_FLAGS.setting("model_path", default=MISSING,
                                         help="local model folder of the LLM that writes the tree (ignored with "
                                              "--api_base)")
    domain: str = setting(check=Check(lambda v: bool(v.strip()), "non-empty"),
                          help="the domain: the tree's root and the prompts' subject")
    output_dir: str = setting(role=OUTPUT, help="folder of the tree file")
    output_filename: str = setting(role=OUTPUT, help="the tree file's name")
    gpu_ids: list[int] = TREE_FLAGS.setting("gpu_ids")
    nodes_per_level: list[int] = setting([6, 4], check=Check(lambda v: bool(v) and min(v) >= 1,
                                                             "positive integers like 6,4"),
                                         help="children per node at each level (the tree's depth is the list's length)")
    max_retries: int = setting(3, check=at_least(0), help="extra asks for a node that got too few names (then it "
                                                          "keeps what it has)")
    lang: str = setting("auto", choices=("auto", "en", "zh"),
                        help="prompt language; auto = zh when the domain name is Chinese")
    max_new_tokens: int = setting(256, check=at_least(1), help="reply length limit, in tokens")
    temperature: float = setting(0.0, check=at_least(0),
                                 help=f"0 = greedy (retries then sample at {RETRY_TEMPERATURE})")
    seed: int = setting(0, help="sampling seed")
    dtype: str = TREE_FLAGS.setting("dtype")
    trust_remote_code: bool = TREE_FLAGS.setting("trust_remote_code")
    api_base: str = TREE_FLAGS.setting("api_base", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 "
                                                        "(instead of a folder)")
    api_model: str = TREE_FLAGS.setting("api_model", help="model name the server knows (required with --api_base)")
    api_key_env: str = TREE_FLAGS.setting("api_key_env")
    api_concurrency: int = TREE_FLAGS.setting("api_concurrency")
    api_timeout_s: float = TREE_FLAGS.setting("api_timeout_s")
    api_max_attempts: int = TREE_FLAGS.setting("api_max_attempts")
    model_placement: str = TREE_FLAGS.setting("model_placement")

    def __post_init__(self) -> None:
        if self.api_base:
            self.model_path = ""  # not used: the endpoint writes the tree
        super().__post_init__()

    def problems(self) -> list[str]:
        return TREE_FLAGS.problems(self)

    @property
    def writer(self) -> ModelSource:
        return TREE_FLAGS.of(self)

    def outputs(self) -> list[Path]:
        return [Path(self.output_dir) / self.output_filename]


def retry_temperature(temperature: float, attempt: int) -> float:
    return temperature if attempt == 0 or temperature > 0 else RETRY_TEMPERATURE


def asker(cfg: TreeConfig) -> tuple[Ask, LocalModel]:
    """ask(prompts, attempt) through the tree's writer (`ModelSource.texts`): a local model (one copy: the
    first GPU, or spread, or the CPU; chat template) answers a level's prompts in one generate call, an
    endpoint gets one request per prompt; each try has its own seed. Returns the local model too, to free."""
    writer = cfg.writer
    per_gpu, spread = writer.placement()
    local = LocalModel(writer, spread)
    log.info("asking %s", writer.name if writer.is_served else f"{writer.model_path} on "
             f"{f'GPUs {spread}' if spread else f'GPU {per_gpu[0]}' if per_gpu else 'the CPU'}")

    def ask(prompts: list[str], attempt: int) -> list[str]:
        seed = cfg.seed + attempt
        batch = PromptBatch([Prompt(str(i), p, seed) for i, p in enumerate(prompts)], seed=seed)
        texts = writer.texts([batch], max_new_tokens=cfg.max_new_tokens,
                             temperature=retry_temperature(cfg.temperature, attempt), local=local,
                             workers=per_gpu[:1], desc=f"tree level, try {attempt + 1}")
        return [texts[str(i)] for i in range(len(prompts))]
    return ask, local


def run(cfg: TreeConfig) -> AbilityTree | None:
    """Ask the model level by level and write the nested tree; None when it was already written."""
    return run_stage(cfg, lambda: check_inputs(cfg), built_tree)


def check_inputs(cfg: TreeConfig) -> tuple[TreeConfig, str]:
    """The writer's settings checked; the prompts' language."""
    from .prompts import detect_language

    cfg.writer.check()
    return cfg, detect_language([cfg.domain]) if cfg.lang == "auto" else cfg.lang


def built_tree(job: tuple[TreeConfig, str], _parts) -> Outputs:
    """The tree, level by level (returned), and its nested form to write."""
    cfg, lang = job
    ask, local = asker(cfg)
    tree, shortfalls = build_tree(ask, cfg.domain.strip(), cfg.nodes_per_level, lang, cfg.max_retries)
    local.release()
    depth_counts = [sum(1 for n in tree.nodes() if len(n.path) == d + 1) for d in range(1, len(cfg.nodes_per_level) + 1)]
    log.info("%s nodes per level (asked %s), %d shortfall(s)", depth_counts,
             [cfg.nodes_per_level[0]] + [a * b for a, b in zip(depth_counts, cfg.nodes_per_level[1:])],
             len(shortfalls))
    return Outputs(tree, {cfg.outputs()[0]: tree.to_nested()})
