"""Where a model is: a local Hugging Face folder, or an OpenAI-compatible endpoint, and how to use it.

`ModelSource` is the one settings group for it (folder; endpoint base, model name, key variable,
concurrency, timeout, tries; GPU ids, placement, dtype, trust_remote_code), and the one place that
decides "local model or endpoint":

- `check()`: the folder holds a model, or a server answers at the endpoint (before any work);
- `texts(batches, ...)`: prompts in, texts out, resumable: a local model generates batch by batch
  (one sampler seed per batch, one worker per GPU), an endpoint gets one request per prompt (its own
  seed), `concurrency` in flight, retried; with a part log, finished work is kept (whole batches
  locally, single replies at an endpoint) and a rerun does only the rest, with the same seeds, so
  it writes what an uninterrupted run would have. Tree building and question writing use it;
  answering (steps A, D, D3, L, G; `atkd.answering`) builds its `Answerer` from a source.

A stage declares a source's settings with `SourceFlags`: the flag name of each setting in that
stage (today's names: C's `--teacher_model_path` and `--api_base`, D's `--agent_model_1_path` and
`--agent_1_api_base`), its declaration (default, check, help) coming from here; `flags.of(cfg)`
reads the source back from a config.
"""

from __future__ import annotations

import logging
from dataclasses import MISSING, dataclass, field
from typing import Any

from .cli import (MODEL, api_concurrency, api_key_env, api_max_attempts, api_timeout_s, dtype, gpu_ids,
                  model_placement, setting, trust_remote_code)

log = logging.getLogger(__name__)

SOURCE_FIELDS = ("model_path", "api_base", "api_model", "api_key_env", "api_concurrency", "api_timeout_s",
                 "api_max_attempts", "gpu_ids", "model_placement", "dtype", "trust_remote_code")
ENDPOINT_FIELDS = SOURCE_FIELDS[1:7]


@dataclass(frozen=True)
class ModelSource:
    """One model: its folder, or (`api_base` set) the endpoint serving it as `api_model`."""

    model_path: str = ""
    api_base: str = ""  # e.g. http://127.0.0.1:8000/v1
    api_model: str = ""  # the model name the server serves
    api_key_env: str = "OPENAI_API_KEY"  # the environment variable holding the key (never the key itself)
    api_concurrency: int = 8  # requests in flight at once
    api_timeout_s: float = 300.0  # seconds per try of one request
    api_max_attempts: int = 4  # tries per request
    gpu_ids: tuple[int, ...] = ()  # local: the GPUs asked for (empty: the CPU)
    model_placement: str = "auto"  # local, several GPUs: per_gpu | spread | auto (`models.placement_plan`)
    dtype: str = "auto"
    trust_remote_code: bool = False

    @property
    def is_served(self) -> bool:
        return bool(self.api_base)

    @property
    def name(self) -> str:
        """How reports name it: "model @ endpoint", or the folder."""
        return f"{self.api_model} @ {self.api_base}" if self.is_served else self.model_path

    @property
    def identity(self) -> str:
        """What the outputs record as the model: the served model's name, or the folder."""
        return self.api_model if self.is_served else self.model_path

    def client(self):
        """The endpoint's client (`atkd.api.ChatAPI`)."""
        from .api import ChatAPI

        return ChatAPI(self.api_base, self.api_model, api_key_env=self.api_key_env, timeout_s=self.api_timeout_s,
                       max_attempts=self.api_max_attempts, concurrency=self.api_concurrency)

    def check(self) -> None:
        """`InputError` unless a server answers at the endpoint, or the folder holds a model."""
        from .models import check_model_dir

        if self.is_served:
            self.client().check_reachable()
        else:
            check_model_dir(self.model_path)

    def placement(self) -> tuple[list[int], list[int]]:
        """(GPUs with one local worker each, GPUs one copy is spread over), from the usable GPUs and the
        placement (`models.placement_plan`); nothing for an endpoint."""
        from .models import placement_plan, usable_gpu_ids

        if self.is_served:
            return [], []
        return placement_plan(self.model_path, usable_gpu_ids(list(self.gpu_ids)), self.model_placement)

    def texts(self, batches: list[PromptBatch], *, max_new_tokens: int, temperature: float, top_p: float = 1.0,
              part_log=None, local: LocalModel | None = None, workers: list[int] | None = None,
              desc: str = "generating") -> dict[str, str]:
        """Every prompt's reply by prompt id; what `part_log` holds already is not asked again.

        Local: each batch is one generate call seeded with the batch's seed, on `local`'s model (kept
        loaded for the caller's next call), one worker per GPU of `workers` (empty: one, on the CPU or
        spread). A batch counts as done only when all its prompts are logged: one cut short by a kill is
        regenerated whole, so its text is what the uninterrupted run wrote. Endpoint: each prompt is its
        own request with its own seed, logged the moment it arrives, so each logged reply counts.
        """
        from .workers import run_workers

        part_log = part_log if part_log is not None else MemoryLog()
        done = part_log.open()
        ids = [p.id for b in batches for p in b.prompts]
        if self.is_served:
            todo = [p for b in batches for p in b.prompts if p.id not in done]
            if len(todo) < len(ids):
                log.info("%s: %d of %d replies already written by an earlier run", desc, len(ids) - len(todo), len(ids))
            if todo:
                self._ask_endpoint(todo, part_log.writer(0), max_new_tokens, temperature, desc)
        else:
            todo = [b for b in batches if not all(p.id in done for p in b.prompts)]
            if len(todo) < len(batches):
                log.info("%s: %d of %d batches already written by an earlier run", desc, len(batches) - len(todo),
                         len(batches))
            run_workers(generate_worker, todo, list(workers or []), part_log,
                        (local or LocalModel(self), max_new_tokens, temperature, top_p, desc))
        done = part_log.done()
        return {i: done[i]["text"] for i in ids}

    def _ask_endpoint(self, prompts: list[Prompt], writer, max_new_tokens: int, temperature: float, desc: str) -> None:
        from .console import progress_bar as tqdm

        with tqdm(total=len(prompts), desc=desc, unit="q") as bar:
            for i, text in self.client().chat_each([(p.text, p.seed) for p in prompts], max_new_tokens, temperature):
                writer.write([{"id": prompts[i].id, "text": text}])
                bar.update(1)


@dataclass
class Prompt:
    """One user message: its id (the part log's key), its text, and the sampler seed of its request to an
    endpoint (an endpoint samples each request on its own)."""

    id: str
    text: str
    seed: int | None = None


@dataclass
class PromptBatch:
    """Prompts a local model generates together, with the sampler seed of that generate call. `cue`: text
    a prompt ends with when the model has no chat template (so it starts the reply's format), put back in
    front of the reply."""

    prompts: list[Prompt]
    seed: int | None = None
    cue: str = ""


class LocalModel:
    """A source's local model, loaded on first use (once per process) and kept until `release`. Sent to
    spawned GPU workers unloaded: each loads its own."""

    def __init__(self, source: ModelSource, spread: list[int] | None = None):
        self.source = source
        self.spread = list(spread or [])  # GPUs one copy is spread over (a single worker); [] = a copy per worker
        self._loaded = None  # (model, tokenizer) in the process that uses it

    def __getstate__(self) -> dict:
        return {"source": self.source, "spread": self.spread, "_loaded": None}

    def get(self, gpu_id: int | None):
        from .models import device_for, load

        if self._loaded is None:
            s = self.source
            self._loaded = load(s.model_path, device_for(gpu_id), s.dtype, s.trust_remote_code, spread_over=self.spread)
        return self._loaded

    def release(self) -> None:
        self._loaded = None


def generate_texts(model, tokenizer, batch: PromptBatch, max_new_tokens: int, temperature: float,
                   top_p: float) -> list[str]:
    """One batch's replies with a local model (chat template, or plain text ending with the batch's cue)."""
    from .generation import generate_batch
    from .prompts import encode_prompt, has_chat_template, render

    cue = "" if has_chat_template(tokenizer) else batch.cue
    ids = [encode_prompt(tokenizer, render(tokenizer, p.text, plain_cue=cue)) for p in batch.prompts]
    return [cue + x for x in generate_batch(model, tokenizer, ids, max_new_tokens, temperature, top_p, seed=batch.seed)]


def generate_worker(rank: int, gpu_id: int | None, batches: list[PromptBatch], writer, payload) -> None:
    """One local worker: generate its batches, one part-log write of `{"id", "text"}` records per batch."""
    from .console import progress_bar as tqdm

    local, max_new_tokens, temperature, top_p, desc = payload
    model, tokenizer = local.get(gpu_id)
    for batch in tqdm(batches, desc=desc, unit="batch", disable=rank != 0):
        texts = generate_texts(model, tokenizer, batch, max_new_tokens, temperature, top_p)
        writer.write([{"id": p.id, "text": x} for p, x in zip(batch.prompts, texts)])


class MemoryLog:
    """A part log kept in memory (`atkd.io.PartLog`'s interface, one worker): for work not worth resuming."""

    def __init__(self):
        self.records: dict[str, dict] = {}

    def open(self) -> dict[str, dict]:
        return self.done()

    def done(self) -> dict[str, dict]:
        return dict(self.records)

    def writer(self, rank: int) -> MemoryLog:
        return self

    def write(self, records: list[dict]) -> None:
        self.records.update((str(r["id"]), r) for r in records)

    def remove(self) -> None:
        self.records.clear()


# --------------------------------------------------------------------------- a source's flags in a stage config

def _declaration(name: str, **overrides) -> Any:
    """The setting of one source field: its default, check and help (`overrides` a stage's own)."""
    made = {"api_key_env": api_key_env, "api_concurrency": api_concurrency, "api_timeout_s": api_timeout_s,
            "api_max_attempts": api_max_attempts, "gpu_ids": gpu_ids, "model_placement": model_placement,
            "dtype": dtype, "trust_remote_code": trust_remote_code}
    if name in made and not overrides:
        return made[name]()
    plain = {
        "model_path": dict(default="", role=MODEL, help="local model folder (unless the endpoint is set)"),
        "api_base": dict(default="", affects_output=False,
                         help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (instead of a folder)"),
        "api_model": dict(default="", help="model name at the endpoint"),
    }
    if name in plain:
        return setting(**{**plain[name], **overrides})
    base = made[name]()  # a shared setting with a stage's own help: keep its default and check
    meta = dict(base.metadata)
    default = base.default if base.default is not MISSING else base.default_factory()
    return setting(**{"default": default, "help": meta["help"], "check": meta["check"], "choices": meta["choices"],
                      "role": meta["role"], "affects_output": meta["affects_output"], **overrides})


@dataclass(frozen=True)
class SourceFlags:
    """The flag names one stage gives a model source's settings (a source field missing from `names` keeps
    its own name: --api_base, --gpu_ids, ...)."""

    names: dict[str, str] = field(default_factory=dict)

    def flag(self, name: str) -> str:
        """The config field (and flag, without --) of source field `name`."""
        return self.names.get(name, name)

    def setting(self, name: str, **overrides) -> Any:
        """The config field of source field `name`, declared here (`overrides`: a stage's default or help)."""
        return _declaration(name, **overrides)

    def of(self, cfg) -> ModelSource:
        """The source a config's fields describe (fields it lacks keep the source's defaults)."""
        values = {name: getattr(cfg, self.flag(name)) for name in SOURCE_FIELDS if hasattr(cfg, self.flag(name))}
        if "gpu_ids" in values:
            values["gpu_ids"] = tuple(values["gpu_ids"])
        return ModelSource(**values)

    def settings(self, source: ModelSource, which: tuple[str, ...]) -> dict:
        """The config fields (by this stage's names) of `which` of the source's settings."""
        return {self.flag(name): list(v) if isinstance(v := getattr(source, name), tuple) else v for name in which}

    def problems(self, cfg) -> list[str]:
        """A model is a folder, or an endpoint with a model name: what is missing, if anything."""
        base, model, path = (getattr(cfg, self.flag(n)) for n in ("api_base", "api_model", "model_path"))
        if base and not model:
            return [f"--{self.flag('api_base')} needs --{self.flag('api_model')} (the model name the server serves)"]
        if not base and not path:
            return [f"give --{self.flag('model_path')} (or --{self.flag('api_base')} and --{self.flag('api_model')})"]
        return []


TREE_FLAGS = SourceFlags()  # create_initial_tree.py, label_abilities.py, generate_logits.py: --model_path
TEACHER_FLAGS = SourceFlags({"model_path": "teacher_model_path"})  # steps C and D3
STUDENT_FLAGS = SourceFlags({"model_path": "student_model_path"})  # step D4
AGENT_FLAGS = {n: SourceFlags({"model_path": f"agent_model_{n}_path", "api_base": f"agent_{n}_api_base",
                               "api_model": f"agent_{n}_api_model"}) for n in (1, 2)}  # step D


@dataclass(kw_only=True)
class EndpointSettings:
    """A stage config's endpoint settings under their own names (--api_base, --api_model, ...): mixed into the
    configs of the stages whose one model may be served instead of read from --model_path (answering,
    labelling, step E)."""

    api_base: str = TREE_FLAGS.setting("api_base")
    api_model: str = TREE_FLAGS.setting("api_model")
    api_key_env: str = TREE_FLAGS.setting("api_key_env")
    api_concurrency: int = TREE_FLAGS.setting("api_concurrency")
    api_timeout_s: float = TREE_FLAGS.setting("api_timeout_s")
    api_max_attempts: int = TREE_FLAGS.setting("api_max_attempts")

    def problems(self) -> list[str]:
        return TREE_FLAGS.problems(self)
