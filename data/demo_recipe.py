"""The embedded demo's recipe: a small clinical-medicine domain, its data, and how its tiny models are trained.

The domain is "which of these belongs to <ability>" questions over a fixed vocabulary of real
entities (drugs, organisms, anatomy, diseases): twelve leaves of ten entities each. A question
names one leaf and offers four entities, one of that leaf and three of other leaves, so a model
answers it only by knowing which entity belongs where, and writes a valid new one only by
knowing that too. Everything here is deterministic from a seed.

Three tiny Llama models share one locally trained byte-level BPE tokenizer (chat template):
- teacher: answers every leaf and writes questions in the pipeline's own prompt format; asked for
  a rationale (the pipeline's rationale prompt) it answers and gives a templated reason
  (`demo_reason`: "B names an anticoagulant; the others do not."); asked which ability a
  question tests (`atkd.prompts.ability_question`, over the tree's areas, then over the leaves of
  one area) it picks the right one;
- agent: a second, independently trained answerer (other seed, other size) for validation;
- student: never asked about `STUDENT_WEAK_LEAVES` (their entities appear only as wrong options),
  so it gets those leaves wrong until the loop distils them in.
`data/build_demo.py` writes the data files and builds the models with the functions below.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from atkd.records import LETTERS

DOMAIN = "Clinical medicine"
LANG = "en"
N_OPTIONS = 4
N_SEED_EXAMPLES = 3  # seed questions shown in a question-writing prompt


@dataclass(frozen=True)
class DemoLeaf:
    """One ability of the demo tree and the entities that belong to it."""

    area: str
    name: str
    noun: str  # "an antibiotic": how a question names one member
    entities: tuple[str, ...]

    @property
    def path(self) -> list[str]:
        return [DOMAIN, self.area, self.name]


def _leaf(area: str, name: str, noun: str, entities: str) -> DemoLeaf:
    return DemoLeaf(area, name, noun, tuple(entities.split()))


LEAVES: tuple[DemoLeaf, ...] = (
    _leaf("Pharmacology", "Antibiotics", "an antibiotic",
          "amoxicillin penicillin ciprofloxacin doxycycline azithromycin vancomycin gentamicin "
          "ceftriaxone clindamycin metronidazole"),
    _leaf("Pharmacology", "Antihypertensives", "an antihypertensive drug",
          "lisinopril amlodipine losartan metoprolol hydrochlorothiazide ramipril valsartan atenolol "
          "nifedipine captopril"),
    _leaf("Pharmacology", "Anticoagulants", "an anticoagulant",
          "warfarin heparin apixaban rivaroxaban dabigatran enoxaparin edoxaban fondaparinux argatroban "
          "bivalirudin"),
    _leaf("Microbiology", "Bacteria", "a bacterium",
          "streptococcus staphylococcus salmonella listeria klebsiella pseudomonas shigella clostridium "
          "neisseria legionella"),
    _leaf("Microbiology", "Viruses", "a virus",
          "influenza measles rubella rabies mumps rotavirus norovirus adenovirus poliovirus varicella"),
    _leaf("Microbiology", "Fungi", "a fungus",
          "candida aspergillus cryptococcus histoplasma trichophyton mucor pneumocystis coccidioides "
          "blastomyces sporothrix"),
    _leaf("Anatomy", "Bones", "a bone",
          "femur tibia fibula humerus radius ulna scapula clavicle patella sternum"),
    _leaf("Anatomy", "Muscles", "a muscle",
          "biceps triceps deltoid trapezius gastrocnemius quadriceps diaphragm masseter soleus sartorius"),
    _leaf("Anatomy", "Nerves", "a nerve",
          "vagus sciatic phrenic trigeminal hypoglossal obturator pudendal glossopharyngeal abducens "
          "oculomotor"),
    _leaf("Internal medicine", "Cardiovascular diseases", "a cardiovascular disease",
          "hypertension angina endocarditis myocarditis pericarditis cardiomyopathy atherosclerosis "
          "arrhythmia aneurysm bradycardia"),
    _leaf("Internal medicine", "Respiratory diseases", "a respiratory disease",
          "asthma pneumonia bronchitis emphysema tuberculosis pneumothorax bronchiectasis sarcoidosis "
          "pleurisy laryngitis"),
    _leaf("Internal medicine", "Endocrine diseases", "an endocrine disease",
          "diabetes hypothyroidism hyperthyroidism acromegaly hyperparathyroidism hypoparathyroidism "
          "pheochromocytoma hyperaldosteronism hypopituitarism thyroiditis"),
)
# One leaf per area that the student never sees, so the loop has something to fix.
STUDENT_WEAK_LEAVES = ("Anticoagulants", "Fungi", "Nerves", "Endocrine diseases")

# A few phrasings, so a question's wording is not one fixed string per leaf.
STEMS = (
    "Which of the following is {noun}?",
    "Which of these is {noun}?",
    "Which of these belongs to {leaf} ({area})?",
    "In {area}, which option names {noun}?",
)

# File names under data/demo/ (the lead's main.py points its constants at these).
ITERATION_FILE = "iteration_{n}.jsonl"
ITERATION_PATHS_FILE = "iteration_{n}_ability_paths.jsonl"
EVAL_FILE = "eval.jsonl"
EVAL_PATHS_FILE = "eval_ability_paths.jsonl"
MODEL_NAMES = ("teacher", "agent", "student")


def leaf_by_name(name: str) -> DemoLeaf:
    for leaf in LEAVES:
        if leaf.name == name:
            return leaf
    raise KeyError(name)


def tree_nested() -> dict:
    """The demo ability tree in the nested initial form (domain -> area -> leaf)."""
    areas: dict[str, dict] = {}
    for leaf in LEAVES:
        areas.setdefault(leaf.area, {})[leaf.name] = {}
    return {DOMAIN: areas}


# --------------------------------------------------------------------------- questions

def make_question(rng: random.Random, leaf: DemoLeaf, qid: str, pool: tuple[DemoLeaf, ...] = LEAVES) -> dict:
    """A question record on `leaf`: one of its entities and three from three other leaves of `pool`."""
    others = rng.sample([x for x in pool if x is not leaf], N_OPTIONS - 1)
    options = [rng.choice(leaf.entities)] + [rng.choice(x.entities) for x in others]
    rng.shuffle(options)
    letters = LETTERS[:N_OPTIONS]
    answer = letters[options.index(next(e for e in options if e in leaf.entities))]
    stem = rng.choice(STEMS).format(noun=leaf.noun, leaf=leaf.name.lower(), area=leaf.area.lower())
    return {"id": qid, "question": stem, "options": dict(zip(letters, options)), "answer_idx": answer,
            "meta_info": f"demo: {leaf.name}"}


@functools.cache
def leaf_of_entity() -> dict[str, DemoLeaf]:
    return {e: leaf for leaf in LEAVES for e in leaf.entities}


def question_is_valid(q: dict, leaf: DemoLeaf) -> bool:
    """True when exactly the labelled option belongs to `leaf` (what a correct demo question is)."""
    owner = leaf_of_entity()
    inside = [k for k, v in q["options"].items() if owner.get(v.strip()) is leaf]
    return inside == [q["answer_idx"]] and all(v.strip() in owner for v in q["options"].values())


def make_split(rng: random.Random, per_leaf: int, prefix: str, leaves=LEAVES) -> tuple[list[dict], list[dict]]:
    """`per_leaf` questions per leaf (leaves interleaved) and their ability-path records."""
    questions, paths = [], []
    for _ in range(per_leaf):
        for leaf in leaves:
            qid = f"{prefix}-{len(questions):04d}"
            questions.append(make_question(rng, leaf, qid))
            paths.append({"id": qid, "ability_path": leaf.path})
    return questions, paths


@dataclass(frozen=True)
class DataConfig:
    """Sizes of the shipped data files."""

    seed: int = 0
    iterations: int = 2
    seeds_per_leaf: int = 16  # per iteration: what the student is measured on and the teacher imitates
    eval_per_leaf: int = 20  # held-out evaluation set


def demo_data(cfg: DataConfig = DataConfig()) -> dict[str, list[dict]]:
    """{file name: records} of every data file of the demo (questions and ability paths)."""
    rng = random.Random(f"demo-data-{cfg.seed}")
    files: dict[str, list[dict]] = {}
    for n in range(1, cfg.iterations + 1):
        qs, paths = make_split(rng, cfg.seeds_per_leaf, f"demo-it{n}")
        files[ITERATION_FILE.format(n=n)] = qs
        files[ITERATION_PATHS_FILE.format(n=n)] = paths
    qs, paths = make_split(rng, cfg.eval_per_leaf, "demo-eval")
    files[EVAL_FILE] = qs
    files[EVAL_PATHS_FILE] = paths
    return files


def demo_reason(q: dict) -> str:
    """The demo teacher's rationale for a question: "B names an anticoagulant; the others do not."

    It restates the answer letter and names the class of the answer's entity; it does not name the
    entity itself. A tiny teacher does not learn to copy the entity from its option line: reasons
    that named it ("B. warfarin is an anticoagulant; ...") named one fixed member of the leaf in
    about nine of ten evaluation questions, a wrong fact the student would then be trained on.
    """
    noun = leaf_of_entity()[q["options"][q["answer_idx"]]].noun
    return f"{q['answer_idx']} names {noun}; the others do not."


def option_set(q: dict) -> tuple:
    """What makes two demo questions the same item: the asked leaf's wording and the option set."""
    return (q["question"], frozenset(q["options"].values()))


# --------------------------------------------------------------------------- tokenizer

TOKENIZER_VOCAB = 1200  # the demo text saturates at ~1,100 tokens; every entity is one token


def tokenizer_corpus(seed: int) -> list[str]:
    """Demo text for the tokenizer: question blocks plus the words of both prompt kinds."""
    from atkd.prompts import LABELS, question_block

    rng = random.Random(f"demo-tokenizer-{seed}")
    blocks = [question_block(_q(make_question(rng, leaf, "t")), LANG, with_answer=True)
              for _ in range(250) for leaf in LEAVES]
    lab = LABELS[LANG]
    words = [lab.mcq_instruction, lab.write_examples, lab.write_task.format(n=N_OPTIONS, first="A", last="D"),
             "Question: <question>\nA. <option>\nAnswer: <letter>"]
    words += [lab.write_intro.format(domain=DOMAIN, ability=" > ".join(leaf.path)) for leaf in LEAVES]
    return blocks + words * 200


def build_tokenizer(seed: int = 0):
    from atkd.tiny import train_tokenizer

    return train_tokenizer(tokenizer_corpus(seed), vocab_size=TOKENIZER_VOCAB)


def _q(record: dict):
    from atkd.records import question_from_dict

    return question_from_dict(record)


# --------------------------------------------------------------------------- training examples

@dataclass
class Example:
    """Token ids and the positions whose token the loss predicts (each from the tokens before it)."""

    ids: list[int]
    targets: list[int]  # indices into `ids`; never 0


class ExampleMaker:
    """Answering and question-writing examples in the pipeline's exact prompt formats.

    A writing example's loss covers the reply (the new question and eos) and also the seed
    questions shown in the prompt: they are questions of the same leaf in the same format, so
    the model learns to write four times as many of them for the same forward pass.
    """

    def __init__(self, tokenizer, held_out: set):
        from atkd.letters import letter_token_ids

        self.tok = tokenizer
        self.held_out = held_out  # option_set()s of evaluation items, never trained on
        letters = LETTERS[:N_OPTIONS]
        self.letter_ids = dict(zip(letters, letter_token_ids(tokenizer, list(letters), LANG)))

    def fresh(self, rng: random.Random, leaf: DemoLeaf, pool: tuple[DemoLeaf, ...] | None = None) -> dict:
        """A training question on `leaf` (distractors from `pool`, default every leaf), never a held-out one."""
        while True:
            q = make_question(rng, leaf, "train", pool or LEAVES)
            if option_set(q) not in self.held_out:
                return q

    def answer(self, rng: random.Random, leaf: DemoLeaf, pool: tuple[DemoLeaf, ...] | None = None) -> Example:
        from atkd.prompts import encode_prompt, mcq_prompt

        q = _q(self.fresh(rng, leaf, pool))
        ids = encode_prompt(self.tok, mcq_prompt(self.tok, q, LANG)) + [self.letter_ids[q.answer_idx]]
        return Example(ids, [len(ids) - 1])

    def explained_answer(self, rng: random.Random, leaf: DemoLeaf, pool: tuple[DemoLeaf, ...] | None = None) -> Example:
        """The MCQ prompt, the letter, then the reason: the teacher-forced sequence of a rationale item
        (`atkd.sequence.training_sequence`), so that, like a real teacher, the demo teacher continues
        its own answer coherently when steps E/F force the reason after the letter."""
        from atkd.sequence import training_sequence

        record = self.fresh(rng, leaf, pool)
        seq = training_sequence(self.tok, _q({**record, "explanation": demo_reason(record)}), LANG, "explanation")
        ids = seq.prompt_ids + seq.response_ids
        return Example(ids, list(range(len(seq.prompt_ids), len(ids))))

    def rationale(self, rng: random.Random, leaf: DemoLeaf, pool: tuple[DemoLeaf, ...] | None = None) -> Example:
        """The pipeline's rationale prompt and its reply: the answer line, then `demo_reason`, then eos."""
        from atkd.prompts import encode_prompt, rationale_prompt, rationale_reply

        record = self.fresh(rng, leaf, pool)
        prompt = encode_prompt(self.tok, rationale_prompt(self.tok, _q(record), LANG))
        reply = rationale_reply(record["answer_idx"], demo_reason(record), LANG)
        ids = prompt + list(self.tok(reply, add_special_tokens=False)["input_ids"]) + [self.tok.eos_token_id]
        return Example(ids, list(range(len(prompt), len(ids))))

    def label(self, rng: random.Random, leaf: DemoLeaf) -> Example:
        """A labelling question (`atkd.prompts.ability_question`): which area does a question on `leaf`
        test (level 1), or which leaf of its area (level 2); the choices in a random order."""
        from atkd.prompts import encode_prompt, mcq_prompt

        record, level = self.fresh(rng, leaf), rng.randrange(2)
        q, letter = label_question(record, leaf, level, rng)
        ids = encode_prompt(self.tok, mcq_prompt(self.tok, q, LANG)) + [self.letter_ids[letter]]
        return Example(ids, [len(ids) - 1])

    def write(self, rng: random.Random, leaf: DemoLeaf) -> Example:
        from atkd.prompts import encode_prompt, question_block, render, write_question_user_text

        seeds = [_q(self.fresh(rng, leaf)) for _ in range(N_SEED_EXAMPLES)]
        text = render(self.tok, write_question_user_text(leaf.path, seeds, N_OPTIONS, LANG, DOMAIN))
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        prompt = list(enc["input_ids"])
        assert prompt == encode_prompt(self.tok, text)  # the offsets must describe the ids the pipeline feeds
        spans, at = [], 0
        for s in seeds:
            block = question_block(s, LANG, with_answer=True)
            at = text.index(block, at)
            spans.append((at, at + len(block)))
            at += len(block)
        targets = [i for i, (a, _b) in enumerate(enc["offset_mapping"])
                   if i > 0 and any(lo <= a < hi for lo, hi in spans)]
        reply = question_block(_q(self.fresh(rng, leaf)), LANG, with_answer=True)
        ids = prompt + list(self.tok(reply, add_special_tokens=False)["input_ids"]) + [self.tok.eos_token_id]
        return Example(ids, targets + list(range(len(prompt), len(ids))))


def label_choices(leaf: DemoLeaf, level: int) -> list[str]:
    """The tree's children a labelling question offers, in tree order: the areas (level 1) or the
    leaves of `leaf`'s area (level 2)."""
    if level == 0:
        return list(dict.fromkeys(x.area for x in LEAVES))
    return [x.name for x in LEAVES if x.area == leaf.area]


def label_question(record: dict, leaf: DemoLeaf, level: int, rng: random.Random | None = None):
    """(the labelling MCQ for a question on `leaf` at `level`, its right letter); `rng` shuffles the choices."""
    from atkd.prompts import ability_question

    names = label_choices(leaf, level)
    if rng is not None:
        rng.shuffle(names)
    right = leaf.area if level == 0 else leaf.name
    return ability_question(_q(record), names, LANG), LETTERS[names.index(right)]


def reply_loss(model, batch: list[Example], pad_id: int) -> torch.Tensor:
    """Mean cross-entropy over the target tokens only; the head runs only where a loss is taken."""
    import torch.nn.functional as F

    width = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    rows, cols, labels = [], [], []
    for r, e in enumerate(batch):
        ids[r, :len(e.ids)] = torch.tensor(e.ids)
        mask[r, :len(e.ids)] = 1  # right padding: causal attention never sees it
        rows += [r] * len(e.targets)
        cols += [p - 1 for p in e.targets]  # position p - 1 predicts token p
        labels += [e.ids[p] for p in e.targets]
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    logits = model.lm_head(hidden[torch.tensor(rows), torch.tensor(cols)])
    return F.cross_entropy(logits.float(), torch.tensor(labels))


# --------------------------------------------------------------------------- models

@dataclass(frozen=True)
class ModelSpec:
    """How one demo model is built and trained."""

    seed: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    steps: int
    answer_batch: int  # answering examples per step
    write_batch: int = 0  # question-writing examples per step (0: an answer-only model)
    rationale_batch: int = 0  # rationale-prompt examples per step, and as many explained answers
    label_batch: int = 0  # labelling examples per step (which area / which leaf a question tests)
    # Weight of the rationale, explained-answer and labelling losses. At 1 they took a share of every
    # (clipped, Adam-normalised) update, and the teacher's written questions fell from 82% to 71% passing
    # both agents; these tasks are templated and are learned at a quarter of the weight.
    aux_weight: float = 0.25
    lr: float = 3e-3
    leaves: tuple[str, ...] = tuple(leaf.name for leaf in LEAVES)
    readout_steps: int = 200  # curriculum stage 1 (see `curriculum`)
    grow_every: int = 100  # curriculum stage 2: one more asked leaf every this many steps


def curriculum(step: int, spec: ModelSpec, leaves: tuple[DemoLeaf, ...]) -> tuple[tuple[DemoLeaf, ...], tuple[DemoLeaf, ...] | None]:
    """(leaves asked about, leaves the distractors come from; None = all) at `step`.

    Trained on the full task from the start, tiny models sit at chance for 1,000+ steps (or
    never leave it): the answer needs the option's group, the asked group and the option's letter
    at once, and none of them pays off alone. So: first, questions on two leaves whose distractors
    come only from the other leaves (the answer is recognisable from the option alone, which
    teaches reading an option's letter); then one more asked leaf every `grow_every` steps with
    distractors from every leaf (which teaches matching the option to the question); then all.
    """
    if step < spec.readout_steps:
        return leaves[:2], leaves[2:]
    k = 3 + (step - spec.readout_steps) // spec.grow_every
    return leaves[:min(k, len(leaves))], None


def lr_at(step: int, total: int, peak: float, warmup: int = 50) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def train_model(spec: ModelSpec, tokenizer, held_out: set, seed: int = 0, progress=None, callback=None):
    """Build a tiny Llama for `tokenizer` and train it on demo examples (CPU, fp32).

    Deterministic from (`seed`, `spec.seed`) for a given torch build and thread count.
    `callback(step, model)` runs after every optimizer step (experiments watch learning with it).
    """
    from atkd.tiny import build_model

    model_seed = seed * 1000 + spec.seed
    model = build_model(tokenizer, family="llama", seed=model_seed, hidden=spec.hidden, layers=spec.layers,
                        heads=spec.heads, intermediate=spec.intermediate, max_positions=512)
    model.train()
    leaves = tuple(leaf_by_name(n) for n in spec.leaves)
    maker = ExampleMaker(tokenizer, held_out)
    rng = random.Random(f"demo-train-{model_seed}")
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.98))
    pad = tokenizer.pad_token_id
    for step in range(spec.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, spec.steps, spec.lr)
        asked, pool = curriculum(step, spec, leaves)
        batch = [maker.answer(rng, rng.choice(asked), pool) for _ in range(spec.answer_batch)]
        loss = reply_loss(model, batch, pad)
        if spec.write_batch:
            loss = loss + reply_loss(model, [maker.write(rng, rng.choice(asked)) for _ in range(spec.write_batch)], pad)
        # Each kind is its own mean: a reason's dozen tokens would otherwise outweigh a letter.
        aux = []
        if spec.rationale_batch:
            aux.append(reply_loss(model, [maker.rationale(rng, rng.choice(asked), pool)
                                          for _ in range(spec.rationale_batch)], pad))
            aux.append(reply_loss(model, [maker.explained_answer(rng, rng.choice(asked), pool)
                                          for _ in range(spec.rationale_batch)], pad))
        if spec.label_batch:
            aux.append(reply_loss(model, [maker.label(rng, rng.choice(leaves)) for _ in range(spec.label_batch)], pad))
        if aux:
            loss = loss + spec.aux_weight * sum(aux)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if callback is not None:
            callback(step + 1, model)
            model.train()
    return model.eval()


# --------------------------------------------------------------------------- measuring the models

def accuracy_by_leaf(model, tokenizer, questions, paths: dict[str, list[str]], batch_size: int = 64) -> dict[str, list[int]]:
    """{leaf name: [correct, n]} from the pipeline's own MCQ scoring (atkd.scoring)."""
    from atkd.scoring import score_questions

    out: dict[str, list[int]] = {}

    def on_batch(results):
        for q, s in results:
            cell = out.setdefault(paths[q.key][-1], [0, 0])
            cell[0] += int(s.pred_letter == q.answer_idx)
            cell[1] += 1

    score_questions(model, tokenizer, questions, LANG, batch_size, on_batch)
    return out


def overall(acc: dict[str, list[int]], leaves=None) -> float:
    cells = [v for k, v in acc.items() if leaves is None or k in leaves]
    return sum(c for c, _ in cells) / max(1, sum(n for _, n in cells))


def write_replies(teacher, tokenizer, leaf: DemoLeaf, seeds: list, n: int, temperature: float, seed: int,
                  batch_size: int = 32, max_new_tokens: int = 64) -> list[str]:
    """`n` replies of the teacher to the pipeline's question-writing prompt for `leaf`.

    Each prompt shows `N_SEED_EXAMPLES` seeds of the leaf, drawn with a seeded RNG.
    """
    from atkd.generation import generate_batch
    from atkd.prompts import encode_prompt, render, write_question_user_text

    rng = random.Random(f"demo-write-{seed}-{leaf.name}")
    prompts = [encode_prompt(tokenizer, render(tokenizer, write_question_user_text(
        leaf.path, rng.sample(seeds, N_SEED_EXAMPLES), N_OPTIONS, LANG, DOMAIN))) for _ in range(n)]
    replies: list[str] = []
    for b in range(0, n, batch_size):
        replies += generate_batch(teacher, tokenizer, prompts[b:b + batch_size], max_new_tokens,
                                  temperature=temperature, seed=seed * 100_003 + b)
    return replies


def pass_counts(replies: list[str], leaf: DemoLeaf, agents: list, seed: int = 0) -> dict[str, int]:
    """How many replies parse, are truly valid for `leaf`, and are answered as labelled by every agent.

    `agents` is a list of (model, tokenizer); their answers come from the pipeline's scoring.
    """
    from atkd.option_order import shuffle_options
    from atkd.qparse import parse_question
    from atkd.scoring import score_questions

    rng = random.Random(f"demo-shuffle-{seed}")
    parsed = []
    for i, text in enumerate(replies):
        item, _reason = parse_question(text)
        if item is not None:  # the answer's letter moved as the pipeline moves it
            options, answer = shuffle_options(item, rng)
            parsed.append(_q({"id": f"gen-{i}", **item, "options": options, "answer_idx": answer}))
    agreed = [True] * len(parsed)
    for model, tokenizer in agents:
        picks: dict[str, str] = {}
        score_questions(model, tokenizer, parsed, LANG, 64,
                        lambda res: picks.update({q.key: s.pred_letter for q, s in res}))
        agreed = [a and picks[q.key] == q.answer_idx for a, q in zip(agreed, parsed)]
    return {"n": len(replies), "parsed": len(parsed),
            "valid": sum(question_is_valid(q.to_dict(), leaf) for q in parsed),
            "passed": sum(agreed)}


def rationale_counts(model, tokenizer, questions, batch_size: int = 32) -> dict[str, int]:
    """How a model's replies to the rationale prompt fare in step D3 (`atkd.rationale_writing.judge`):
    n, kept (answer line = label, a reason follows), exact (the reason is `demo_reason`) and wrong (the
    answer line names another letter)."""
    from atkd.answering import EXPLAIN, Answerer, answer_local
    from atkd.rationale_writing import judge

    who = Answerer(mode=EXPLAIN, lang=LANG, max_new_tokens=48)
    out = {"n": 0, "kept": 0, "exact": 0, "wrong": 0}
    for b in range(0, len(questions), batch_size):
        batch = questions[b:b + batch_size]
        for q, answer in zip(batch, answer_local(model, tokenizer, batch, who)):
            why, reason = judge(q, answer)
            out["n"] += 1
            out["kept"] += why is None
            out["exact"] += why is None and reason == demo_reason(q.to_dict())
            out["wrong"] += why == "disagrees"
    return out


def labelling_accuracy(model, tokenizer, questions, paths: dict[str, list[str]], level: int) -> list[int]:
    """[correct, n] of the labelling question at `level` (0: which area, 1: which leaf of the area), the
    choices in tree order as a labelling stage shows them, scored like any MCQ (`atkd.scoring`)."""
    from atkd.scoring import score_questions

    asked, right = [], {}
    for q in questions:
        lq, letter = label_question(q.to_dict(), leaf_by_name(paths[q.key][-1]), level)
        asked.append(lq)
        right[lq.key] = letter
    cell = [0, 0]

    def on_batch(results):
        for lq, s in results:
            cell[0] += int(s.pred_letter == right[lq.key])
            cell[1] += 1

    score_questions(model, tokenizer, asked, LANG, 64, on_batch)
    return cell


# --------------------------------------------------------------------------- building everything

def load_split(data_dir: str | Path, questions_file: str, paths_file: str):
    """(questions, {id: ability path}) of one shipped split, validated by atkd.records."""
    from atkd.records import load_ability_paths, load_questions

    data_dir = Path(data_dir)
    return load_questions(data_dir / questions_file), load_ability_paths(data_dir / paths_file)


def seeds_by_leaf(questions, paths: dict[str, list[str]]) -> dict[str, list]:
    out: dict[str, list] = {}
    for q in questions:
        out.setdefault(paths[q.key][-1], []).append(q)
    return out


def write_data(data_dir: str | Path, tree_path: str | Path, cfg: DataConfig = DataConfig()) -> list[Path]:
    """Write every data file and the demo tree; returns the paths written."""
    from atkd.io import write_json, write_jsonl

    written = []
    for name, records in demo_data(cfg).items():
        write_jsonl(Path(data_dir) / name, records)
        written.append(Path(data_dir) / name)
    write_json(tree_path, tree_nested())
    return written + [Path(tree_path)]


# --------------------------------------------------------------------------- the shipped demo

REPO = Path(__file__).resolve().parent.parent  # this file is data/demo_recipe.py
DATA_DIR = REPO / "data" / "demo"
MODELS_DIR = DATA_DIR / "models"
TREE_PATH = REPO / "ability_trees" / "demo_tree.json"

# The recipe of the shipped models (data/build_demo.py); steps are optimizer steps. Teacher 0.8M
# parameters, agent and student 0.4M each. Four layers matter: three-layer answerers learned the
# task less well and forgot old leaves when fine-tuned on new ones.
MODEL_SPECS = {
    "teacher": ModelSpec(seed=1, hidden=96, layers=4, heads=4, intermediate=384, steps=2000,
                         answer_batch=64, write_batch=16, rationale_batch=8, label_batch=8),
    "agent": ModelSpec(seed=2, hidden=64, layers=4, heads=4, intermediate=256, steps=2500, answer_batch=64),
    # The student also answers the rationale prompt (on its own leaves only), so that on-policy practice
    # (RESPONSES student: step D4 samples its replies) has letters to practise on the demo.
    "student": ModelSpec(seed=3, hidden=64, layers=4, heads=4, intermediate=256, steps=2500, answer_batch=64,
                         rationale_batch=8,
                         leaves=tuple(leaf.name for leaf in LEAVES if leaf.name not in STUDENT_WEAK_LEAVES)),
}


def held_out_keys(cfg: DataConfig = DataConfig()) -> set:
    """option_set()s of the evaluation set: no model is ever trained on those items."""
    return {option_set(q) for q in demo_data(cfg)[EVAL_FILE]}


def build_models(models_dir: str | Path = MODELS_DIR, seed: int = 0, dtype: torch.dtype = torch.float16,
                 specs: dict[str, ModelSpec] | None = None, progress: bool = True,
                 names: tuple[str, ...] = MODEL_NAMES) -> dict[str, Path]:
    """Train the tokenizer and the models `names` (default all three) and save them (weights cast to `dtype`).

    Each model depends only on the seed, its spec and the tokenizer (itself built from the seed), so
    rebuilding one leaves the others' weights valid.
    """
    from tqdm import tqdm

    from atkd.tiny import save_model

    specs = {name: spec for name, spec in (specs or MODEL_SPECS).items() if name in names}
    tokenizer = build_tokenizer(seed)
    held_out = held_out_keys(DataConfig(seed=seed))
    bar = tqdm(total=sum(s.steps for s in specs.values()), desc="demo models", unit="step", disable=not progress)
    out = {}
    for name, spec in specs.items():
        bar.set_description(f"demo {name}")
        model = train_model(spec, tokenizer, held_out, seed=seed, progress=bar)
        out[name] = save_model(model.to(dtype), tokenizer, Path(models_dir) / name)
    bar.close()
    return out


def demo_figures(models_dir: str | Path = MODELS_DIR, data_dir: str | Path = DATA_DIR, per_leaf: int = 16,
                 temperature: float = 0.8, seed: int = 0) -> dict:
    """The shipped models' figures, measured with the pipeline's own loading, scoring and parsing.

    accuracy: {model: {leaf: [correct, n]}} on the evaluation set; writing: per leaf, `per_leaf`
    questions the teacher writes (seeds from iteration 1) and how many parse, are truly valid
    and pass both agents (teacher and agent) after the answer's position is shuffled;
    rationales: per leaf, the teacher's replies to the rationale prompt on the evaluation set that
    step D3 keeps, and how many give exactly the templated reason; student_rationales: the same for the
    student's replies (greedy; kept = its answer line names the right letter); labelling: per level, the
    teacher's [correct, n] on "which ability does this question test" over the evaluation set.
    """
    from atkd.models import load_model, load_tokenizer

    models_dir = Path(models_dir)
    tok = load_tokenizer(models_dir / "teacher")
    models = {name: load_model(models_dir / name) for name in MODEL_NAMES}
    evalq, eval_paths = load_split(data_dir, EVAL_FILE, EVAL_PATHS_FILE)
    seeds = seeds_by_leaf(*load_split(data_dir, ITERATION_FILE.format(n=1), ITERATION_PATHS_FILE.format(n=1)))
    accuracy = {name: accuracy_by_leaf(m, tok, evalq, eval_paths) for name, m in models.items()}
    agents = [(models["teacher"], tok), (models["agent"], tok)]
    writing = {leaf.name: pass_counts(write_replies(models["teacher"], tok, leaf, seeds[leaf.name], per_leaf,
                                                    temperature, seed), leaf, agents, seed)
               for leaf in LEAVES}
    by_leaf = {leaf.name: [q for q in evalq if eval_paths[q.key][-1] == leaf.name] for leaf in LEAVES}
    rationales = {name: rationale_counts(models["teacher"], tok, qs) for name, qs in by_leaf.items()}
    student_rationales = {name: rationale_counts(models["student"], tok, qs) for name, qs in by_leaf.items()}
    labelling = {f"level_{level + 1}": labelling_accuracy(models["teacher"], tok, evalq, eval_paths, level)
                 for level in (0, 1)}
    return {"accuracy": accuracy, "writing": writing, "per_leaf": per_leaf, "temperature": temperature,
            "rationales": rationales, "student_rationales": student_rationales, "labelling": labelling}


def figures_table(fig: dict) -> str:
    """A plain-text table of `demo_figures` (what data/build_demo.py prints)."""
    acc, wr, ra, sr = fig["accuracy"], fig["writing"], fig.get("rationales"), fig.get("student_rationales")
    lines = [f"{'leaf':<26}{'teacher':>8}{'agent':>8}{'student':>8}{'written':>9}{'valid':>7}{'passed':>8}"
             + (f"{'reason':>8}" if ra else "") + (f"{'s.reason':>9}" if sr else "")]
    for leaf in LEAVES:
        cells = [acc[m][leaf.name][0] / acc[m][leaf.name][1] for m in MODEL_NAMES]
        w = wr[leaf.name]
        weak = " *" if leaf.name in STUDENT_WEAK_LEAVES else ""
        lines.append(f"{leaf.name + weak:<26}" + "".join(f"{c:>8.2f}" for c in cells)
                     + f"{w['n']:>9}{w['valid'] / w['n']:>7.2f}{w['passed'] / w['n']:>8.2f}"
                     + (f"{ra[leaf.name]['kept'] / ra[leaf.name]['n']:>8.2f}" if ra else "")
                     + (f"{sr[leaf.name]['kept'] / sr[leaf.name]['n']:>9.2f}" if sr else ""))
    tot = {k: sum(w[k] for w in wr.values()) for k in ("n", "parsed", "valid", "passed")}

    def kept(counts: dict) -> float:
        return sum(r["kept"] for r in counts.values()) / sum(r["n"] for r in counts.values())

    lines.append(f"{'all':<26}" + "".join(f"{overall(acc[m]):>8.2f}" for m in MODEL_NAMES)
                 + f"{tot['n']:>9}{tot['valid'] / tot['n']:>7.2f}{tot['passed'] / tot['n']:>8.2f}"
                 + (f"{kept(ra):>8.2f}" if ra else "") + (f"{kept(sr):>9.2f}" if sr else ""))
    lines.append("(* = left out of the student's training; accuracy on the evaluation set; written = "
                 "questions the teacher wrote, valid = truly correct, passed = both agents agree; reason = "
                 "the teacher's rationale for an evaluation question kept by step D3; s.reason = the same "
                 "for the student's)")
    for level, (c, n) in (fig.get("labelling") or {}).items():
        lines.append(f"teacher labelling, {level.replace('_', ' ')} (which {'area' if level == 'level_1' else 'leaf'}"
                     f" a question tests): {c}/{n} = {c / n:.2f}")
    return "\n".join(lines)
