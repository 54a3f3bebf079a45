"""Public medical multiple-choice datasets read into AT-KD's question format (data/convert.py).

The split into iteration pools and an evaluation set is `atkd.convert.splitting`; the files and the report
data/convert.py writes are `atkd.convert.conversion`.

One reader per source layout. Each returns a `Converted`: the question records
(`{"id", "question", "options": {"A": ...}, "answer_idx", "meta_info", ...}`, every one valid
for `records.question_problem`), the ability paths where the source has categories, and how many
rows were dropped and why.

Rows the public releases are known to hold that are not one clean single-answer question are
dropped and counted by reason (`DROP_REASONS`): no answer (MedMCQA's test split), several answers
(CMExam's "ACD"), an answer that is not among the options, an empty or a repeated option (the same
text after NFKC and with spaces and a final period removed, `qparse.option_key`; case counts, so
CMMLU's genotypes "GG", "gg", "Gg" and "Co"/"CO", "mg"/"Mg" are different options). A file
that cannot be read as its layout at all (a line that is not JSON, a missing column, a field of the
wrong type) raises `InputError` naming the file and line, so the caller writes nothing.

Ids are `<format>-<file key>-<line>`: the file key is the file's stem (qualified by its folder when
two inputs share a stem, as CMMLU's dev/ and test/ do) and the line is where the row starts in that
file, so an id leads back to its source row. The generic readers can take ids from a column.

Layouts (as published):
- medqa: JSONL `{"question", "options": {"A": ..., "E": ...}, "answer_idx", "answer", "meta_info"}`
  (4 or 5 options; `meta_info` such as "step1" is kept; no categories).
- medmcqa: JSONL `{"id", "question", "opa".."opd", "cop", "choice_type", "exp", "subject_name",
  "topic_name"}`; `cop` is 1-based in the original release, 0-based in Hugging Face copies, and
  -1 or absent in the test split; path = [subject, topic] (just [subject] without a topic).
  `choice_type` "multi" rows ("all of the following except ...") still have one `cop` and are kept.
- cmexam: CSV with `Question`, `Options` ("A xxx" lines), `Answer` (may be several letters),
  `Explanation` and category columns (`Disease Group`, `Clinical Department`, `Medical Discipline`,
  `Competency`, `Difficulty level`); path = the chosen category columns, in order.
- mmlu: headerless CSV `question,A,B,C,D,answer`, one file per subject `<subject>_test.csv`.
- cmmlu: CSV with header `,Question,A,B,C,D,Answer` (the first, index column is unnamed), one
  file per subject `<subject>.csv`.
"""

from __future__ import annotations

import csv
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ..errors import InputError
from ..io import iter_jsonl
from ..qparse import option_key, option_named
from ..records import LETTERS, MAX_OPTIONS, MIN_OPTIONS, question_problem

NO_ANSWER = "no answer"
MULTI_ANSWER = "multi-answer"
ANSWER_OUTSIDE = "answer outside options"
EMPTY_QUESTION = "empty question"
UNPARSABLE_OPTIONS = "unparsable options"
EMPTY_OPTION = "empty option"
TOO_FEW_OPTIONS = "too few options"
TOO_MANY_OPTIONS = "too many options"
DUPLICATE_OPTIONS = "duplicate options"
DROP_REASONS = (NO_ANSWER, MULTI_ANSWER, ANSWER_OUTSIDE, EMPTY_QUESTION, UNPARSABLE_OPTIONS,
                EMPTY_OPTION, TOO_FEW_OPTIONS, TOO_MANY_OPTIONS, DUPLICATE_OPTIONS)

CMEXAM_CATEGORY_COLUMNS = ("Disease Group", "Clinical Department", "Medical Discipline", "Competency",
                           "Difficulty level")
# One level, because departments (内科, 外科, 儿科 ...) are what a clinical ability tree branches on
# first; "Medical Discipline,Clinical Department" gives a two-level tree instead.
CMEXAM_DEFAULT_PATH_COLUMNS = ("Clinical Department",)
CMEXAM_NOT_APPLICABLE = "不符合"  # CMExam's "not applicable" category: no ability, not a name
MMLU_SPLIT_SUFFIXES = ("_test", "_dev", "_val")
ANSWER_FORMATS = ("letter", "index0", "index1", "text")


# --------------------------------------------------------------------------- results

@dataclass
class Candidate:
    """One source row before the checks: options in order, the answer as a 0-based index."""

    id: str
    question: str
    options: list[str] | None  # None: the options cell could not be read as options
    answer: int | None
    answer_problem: str | None  # why `answer` is None (a DROP reason)
    meta_info: Any = None
    extra: dict = field(default_factory=dict)
    path: list[str] = field(default_factory=list)


@dataclass
class Converted:
    """What a reader made of its files: records, ability paths by id, drops by reason."""

    records: list[dict] = field(default_factory=list)
    paths: dict[str, list[str]] = field(default_factory=dict)
    dropped: Counter = field(default_factory=Counter)
    per_file: dict[str, dict] = field(default_factory=dict)  # file key -> {"path", "kept", "dropped"}
    notes: list[str] = field(default_factory=list)  # decisions taken from the data, for the report
    _lines: dict[str, tuple[str, int]] = field(default_factory=dict, repr=False)

    def start_file(self, key: str, path: Path) -> None:
        self.per_file[key] = {"path": str(path), "kept": 0, "dropped": Counter()}

    def take(self, key: str, path: Path, line: int, cand: Candidate) -> None:
        """Keep `cand` as a record, or count why it is dropped."""
        reason = drop_reason(cand)
        if reason:
            self.dropped[reason] += 1
            self.per_file[key]["dropped"][reason] += 1
            return
        if cand.id in self._lines:
            first = self._lines[cand.id]
            raise InputError(path, f"duplicate id {cand.id!r} (first seen at {first[0]}:{first[1]})", line)
        self._lines[cand.id] = (str(path), line)
        self.records.append(record_of(cand))
        if cand.path:
            self.paths[cand.id] = cand.path
        self.per_file[key]["kept"] += 1


def drop_reason(c: Candidate) -> str | None:
    """Why `c` cannot be a single-answer question, or None when it can."""
    if c.answer is None:
        return c.answer_problem or NO_ANSWER
    if not c.question:
        return EMPTY_QUESTION
    if c.options is None:
        return UNPARSABLE_OPTIONS
    if any(not o for o in c.options):
        return EMPTY_OPTION
    if len(c.options) < MIN_OPTIONS:
        return TOO_FEW_OPTIONS
    if len(c.options) > MAX_OPTIONS:
        return TOO_MANY_OPTIONS
    if len({option_key(o) for o in c.options}) < len(c.options):
        return DUPLICATE_OPTIONS
    if not 0 <= c.answer < len(c.options):
        return ANSWER_OUTSIDE
    return None


def record_of(c: Candidate) -> dict:
    """The question record of a checked candidate (extra fields after the standard ones)."""
    rec = {"id": c.id, "question": c.question, "options": dict(zip(LETTERS, c.options)),
           "answer_idx": LETTERS[c.answer], "meta_info": c.meta_info}
    rec.update(c.extra)
    problem = question_problem(rec)
    if problem:  # drop_reason covers every rule of question_problem: reaching here is a bug
        raise RuntimeError(f"converted record {c.id!r} is invalid: {problem}")
    return rec


# --------------------------------------------------------------------------- small helpers

def is_missing(value: Any) -> bool:
    """None, NaN (pandas exports write it into JSON) or blank text."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def text_of(value: Any, path: Path, line: int, name: str) -> str:
    """A cell as stripped text; numbers become text; a list or object is a broken file."""
    if is_missing(value):
        return ""
    if isinstance(value, bool) or isinstance(value, (list, dict)):
        raise InputError(path, f'"{name}" must be text, found {type(value).__name__}', line)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def int_or_none(value: Any) -> int | None:
    """An integer written as int, integral float or digit string; anything else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    return None


def letter_answer(value: Any) -> tuple[int | None, str | None]:
    """(0-based index, None) for one answer letter, else (None, why): no, several or a bad answer.

    Several letters count as several answers when written apart ("A, C") or run together in
    order ("ACD", CMExam's form); a word like "NONE" is not a run of answer letters.
    """
    if is_missing(value) or value == []:
        return None, NO_ANSWER
    parts = [str(v) for v in value] if isinstance(value, list) else re.split(r"[\s,;/.、，；．]+", str(value))
    letters: list[str] = []
    for part in (p.strip().upper() for p in parts):
        if not part:
            continue
        if not re.fullmatch(r"[A-Z]+", part) or list(part) != sorted(set(part)):
            return None, ANSWER_OUTSIDE
        letters.extend(part)
    distinct = list(dict.fromkeys(letters))
    if not distinct:
        return None, NO_ANSWER
    if len(distinct) > 1:
        return None, MULTI_ANSWER
    return LETTERS.index(distinct[0]), None


def index_answer(value: Any, base: int) -> tuple[int | None, str | None]:
    """(0-based index, None) for one option number counted from `base`; -1 or absent: no answer."""
    if is_missing(value) or value == []:
        return None, NO_ANSWER
    parts = value if isinstance(value, list) else (
        re.split(r"[\s,;/]+", value.strip()) if isinstance(value, str) else [value])
    numbers = [int_or_none(p) for p in parts if not (isinstance(p, str) and not p)]
    if any(n is None for n in numbers):
        return None, ANSWER_OUTSIDE
    distinct = list(dict.fromkeys(numbers))
    if distinct == [-1]:
        return None, NO_ANSWER
    if len(distinct) > 1:
        return None, MULTI_ANSWER
    return distinct[0] - base, None


def text_answer(value: Any, options: list[str] | None) -> tuple[int | None, str | None]:
    """(index of the option whose text is the answer, None), or (None, why): `qparse.option_named`,
    so case decides between options that differ only in case."""
    if is_missing(value):
        return None, NO_ANSWER
    if options is None:
        return None, UNPARSABLE_OPTIONS
    index = option_named(str(value), options)
    return (None, ANSWER_OUTSIDE) if index is None else (index, None)


OPTION_LINE = re.compile(r"\s*([A-Z])\s*[.．、:：)）]?\s*(.*)", re.S)


def options_from_lines(text: str) -> list[str] | None:
    """Options from "A xxx" lines (CMExam), or None when the lines are not A, B, C... in order."""
    lines = [line for line in text.splitlines() if line.strip()]
    options = []
    for i, line in enumerate(lines):
        m = OPTION_LINE.fullmatch(line)
        if not m or i >= len(LETTERS) or m.group(1) != LETTERS[i]:
            return None
        options.append(m.group(2).strip())
    return options or None


def options_from_value(value: Any, path: Path, line: int, name: str) -> list[str] | None:
    """Options from a dict keyed A, B..., a list, or "A xxx" lines; None when lines are unreadable."""
    if isinstance(value, dict):
        keys = list(value)
        if sorted(keys) != list(LETTERS[: len(keys)]):
            raise InputError(path, f'"{name}" keys must be consecutive capital letters from A, found '
                                   f'{", ".join(map(str, keys)) or "none"}', line)
        return [text_of(value[k], path, line, f"{name}.{k}") for k in LETTERS[: len(keys)]]
    if isinstance(value, list):
        return [text_of(v, path, line, name) for v in value]
    if isinstance(value, str):
        return options_from_lines(value)
    if is_missing(value):
        return []
    raise InputError(path, f'"{name}" must be an object, a list or "A xxx" lines, found {type(value).__name__}', line)


def path_from_values(values: Sequence[str]) -> list[str]:
    """An ability path from category values in order, cut at the first missing one (empty, or
    CMExam's "不符合", not applicable); no path when the first is missing."""
    path = []
    for v in values:
        if not v or v == CMEXAM_NOT_APPLICABLE:
            break
        path.append(v)
    return path


def subject_of(stem: str, suffixes: Sequence[str] = ()) -> str:
    """"clinical_knowledge_test" -> "clinical knowledge"."""
    for suffix in suffixes:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            stem = stem[: -len(suffix)]
            break
    return stem.replace("_", " ").strip()


def file_keys(paths: Sequence[Path]) -> list[str]:
    """A short unique name per input for ids: its stem, or `<folder>-<stem>` where stems clash."""
    seen: dict[Path, Path] = {}
    for p in paths:
        real = p.resolve()
        if real in seen:
            raise InputError(p, f"given twice (also as {seen[real]})")
        seen[real] = p
    stems = Counter(p.stem for p in paths)
    keys = [p.stem if stems[p.stem] == 1 else f"{p.parent.name}-{p.stem}" for p in paths]
    clash = [k for k, n in Counter(keys).items() if n > 1]
    if clash:
        p = paths[keys.index(clash[0])]
        raise InputError(p, f"two inputs are both named {clash[0]!r} even with their folders; rename one")
    return keys


# --------------------------------------------------------------------------- reading files

def first_non_utf8_line(path: Path) -> int | None:
    """The first line that is not UTF-8 (decoding runs ahead of the rows read, so it is looked up
    afresh; a newline byte is never inside a UTF-8 character, so lines can be checked one by one)."""
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return n
    return None


def jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """`iter_jsonl`, with text that is not UTF-8 reported as bad input too."""
    try:
        yield from iter_jsonl(path)
    except UnicodeDecodeError:
        raise InputError(path, "not UTF-8 text", first_non_utf8_line(path)) from None


def csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line where the row starts, cells) for each non-blank CSV row; a BOM is ignored."""
    if not path.is_file():
        raise InputError(path, "file not found")
    seen_any = False
    with open(path, encoding="utf-8-sig", newline="") as fh:
        # strict: a stray quote is an error here, not a silently merged row
        reader = csv.reader(fh, strict=True)
        start = 1
        try:
            for row in reader:
                if any(cell.strip() for cell in row):
                    seen_any = True
                    yield start, row
                start = reader.line_num + 1
        except csv.Error as err:
            raise InputError(path, f"not valid CSV ({err})", start) from None
        except UnicodeDecodeError:
            raise InputError(path, "not UTF-8 text", first_non_utf8_line(path)) from None
    if not seen_any:
        raise InputError(path, "file is empty (no CSV rows)")


@dataclass
class CsvTable:
    """A CSV file with a header: column positions by name, then the data rows."""

    path: Path
    header_line: int
    header: list[str]
    rows: Iterator[tuple[int, list[str]]]

    def column(self, name: str) -> int:
        """Position of column `name` (exact, else the one that matches ignoring case)."""
        if name in self.header:
            return self.header.index(name)
        folded = [i for i, h in enumerate(self.header) if h.casefold() == name.casefold()]
        if len(folded) == 1:
            return folded[0]
        shown = ", ".join(repr(h) for h in self.header)
        raise InputError(self.path, f'missing column "{name}" (the header has {shown})', self.header_line)

    def column_or_none(self, name: str) -> int | None:
        try:
            return self.column(name)
        except InputError:
            return None

    def data(self) -> Iterator[tuple[int, list[str]]]:
        """Data rows, each checked to have as many cells as the header."""
        for line, row in self.rows:
            if len(row) != len(self.header):
                raise InputError(self.path, f"expected {len(self.header)} columns as in the header, "
                                            f"found {len(row)}", line)
            yield line, [cell.strip() for cell in row]


def csv_table(path: Path) -> CsvTable:
    rows = csv_rows(path)
    line, header = next(rows)
    return CsvTable(path, line, [h.strip() for h in header], rows)


def each_file(paths: Sequence[str | Path], fmt: str, out: Converted) -> Iterator[tuple[str, Path]]:
    """(id key, path) of each input, registered in `out` for the per-file counts."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise InputError(None, f"no input files for --format {fmt}")
    for key, path in zip(file_keys(paths), paths):
        out.start_file(key, path)
        yield key, path


def row_id(fmt: str, key: str, line: int) -> str:
    return f"{fmt}-{key}-{line}"


# --------------------------------------------------------------------------- the readers

def read_medqa(paths: Sequence[str | Path]) -> Converted:
    """MedQA JSONL (US, Mainland, Taiwan; 4 or 5 options). No categories."""
    out = Converted()
    for key, path in each_file(paths, "medqa", out):
        for line, obj in jsonl_rows(path):
            for name in ("question", "options"):
                if name not in obj:
                    raise InputError(path, f'missing field "{name}"', line)
            if not isinstance(obj["options"], dict):
                raise InputError(path, '"options" must be an object like {"A": "...", "B": "..."}', line)
            answer, problem = letter_answer(obj.get("answer_idx"))
            meta = obj.get("meta_info")
            out.take(key, path, line, Candidate(
                id=row_id("medqa", key, line), question=text_of(obj["question"], path, line, "question"),
                options=options_from_value(obj["options"], path, line, "options"),
                answer=answer, answer_problem=problem,
                meta_info=meta if not is_missing(meta) else f"medqa:{key}"))
    return out


MEDMCQA_OPTION_FIELDS = ("opa", "opb", "opc", "opd")


def medmcqa_cop_base(rows: list[tuple[Path, int, dict]]) -> tuple[int, str]:
    """0 or 1, read from the data, and the note saying why; refuses when the data cannot tell.

    Valid answers are 0-3 when 0-based and 1-4 when 1-based, so a 0 proves the first and a 4
    the second; data whose answers are all 1, 2 or 3 fits both.
    """
    zero = four = None
    answered = 0
    for path, line, obj in rows:
        cop = int_or_none(obj.get("cop"))
        if cop is None or cop == -1:
            continue
        answered += 1
        if cop == 0 and zero is None:
            zero = (path, line)
        if cop == 4 and four is None:
            four = (path, line)
    if zero and four:
        raise InputError(zero[0], f"cop is 0 here but 4 at {four[0]}:{four[1]}: the inputs mix 0-based and "
                                  "1-based answers; convert them separately, or settle it with --cop_base 0|1",
                         zero[1])
    if zero:
        return 0, f"cop read as 0-based (Hugging Face copy): cop = 0 at {zero[0]}:{zero[1]}"
    if four:
        return 1, f"cop read as 1-based (original release): cop = 4 at {four[0]}:{four[1]}"
    if answered == 0:
        return 1, "no row has an answer (cop -1 or absent): nothing to read cop's base from"
    first = rows[0][0]
    raise InputError(first, f"cannot tell whether cop is 0-based (Hugging Face copies) or 1-based (original "
                            f"release): none of the {answered} answered rows has cop 0 or 4; "
                            "settle it with --cop_base 0 or --cop_base 1")


def read_medmcqa(paths: Sequence[str | Path], cop_base: int | None = None) -> Converted:
    """MedMCQA JSONL; `cop_base` None reads it from the data (see `medmcqa_cop_base`)."""
    out = Converted()
    rows: list[tuple[Path, int, dict]] = []
    keys: list[str] = []
    for key, path in each_file(paths, "medmcqa", out):
        for line, obj in jsonl_rows(path):
            for name in ("question",) + MEDMCQA_OPTION_FIELDS:
                if name not in obj:
                    raise InputError(path, f'missing field "{name}"', line)
            rows.append((path, line, obj))
            keys.append(key)
    if cop_base is None:
        cop_base, note = medmcqa_cop_base(rows)
    else:
        note = f"cop read as {cop_base}-based (--cop_base)"
    out.notes.append(note)
    for key, (path, line, obj) in zip(keys, rows):
        answer, problem = index_answer(obj.get("cop"), cop_base)
        extra = {}
        exp = text_of(obj.get("exp"), path, line, "exp")
        if exp:
            extra["explanation"] = exp
        if not is_missing(obj.get("id")):
            extra["source_id"] = text_of(obj["id"], path, line, "id")
        if not is_missing(obj.get("choice_type")):
            extra["choice_type"] = text_of(obj["choice_type"], path, line, "choice_type")
        out.take(key, path, line, Candidate(
            id=row_id("medmcqa", key, line), question=text_of(obj["question"], path, line, "question"),
            options=[text_of(obj[f], path, line, f) for f in MEDMCQA_OPTION_FIELDS],
            answer=answer, answer_problem=problem, meta_info=f"medmcqa:{key}", extra=extra,
            path=path_from_values([text_of(obj.get(f), path, line, f) for f in ("subject_name", "topic_name")])))
    return out


def read_cmexam(paths: Sequence[str | Path],
                path_columns: Sequence[str] = CMEXAM_DEFAULT_PATH_COLUMNS) -> Converted:
    """CMExam CSV. Multi-answer rows are dropped; the path is `path_columns`' values in order
    (cut at the first empty or "不符合" (not applicable) value; no path when the first is)."""
    out = Converted()
    for key, path in each_file(paths, "cmexam", out):
        table = csv_table(path)
        q_col, opt_col, ans_col = (table.column(n) for n in ("Question", "Options", "Answer"))
        exp_col = table.column_or_none("Explanation")
        path_cols = [table.column(n) for n in path_columns]
        category_cols = {}
        for name in CMEXAM_CATEGORY_COLUMNS:
            i = table.column_or_none(name)
            if i is not None:
                category_cols[table.header[i]] = i
        for line, row in table.data():
            answer, problem = letter_answer(row[ans_col])
            extra = {}
            if exp_col is not None and row[exp_col]:
                extra["explanation"] = row[exp_col]
            categories = {name: row[i] for name, i in category_cols.items() if row[i]}
            if categories:
                extra["categories"] = categories
            out.take(key, path, line, Candidate(
                id=row_id("cmexam", key, line), question=row[q_col], options=options_from_lines(row[opt_col]),
                answer=answer, answer_problem=problem, meta_info=f"cmexam:{key}", extra=extra,
                path=path_from_values([row[i] for i in path_cols])))
    return out


def read_mmlu(paths: Sequence[str | Path]) -> Converted:
    """MMLU headerless CSV `question,A,B,C,D,answer`; path = [subject from `<subject>_test.csv`]."""
    out = Converted()
    for key, path in each_file(paths, "mmlu", out):
        subject = subject_of(path.stem, MMLU_SPLIT_SUFFIXES)
        for line, row in csv_rows(path):
            if len(row) != 6:
                raise InputError(path, f"expected 6 columns (question,A,B,C,D,answer; no header), found {len(row)}",
                                 line)
            if line == 1 and row[-1].strip().casefold() == "answer":
                raise InputError(path, "this file has a header row; MMLU's files have none "
                                       "(--format cmmlu or --format csv read files with a header)", line)
            row = [cell.strip() for cell in row]
            answer, problem = letter_answer(row[5])
            out.take(key, path, line, Candidate(
                id=row_id("mmlu", key, line), question=row[0], options=row[1:5], answer=answer,
                answer_problem=problem, meta_info=f"mmlu:{key}", path=[subject] if subject else []))
    return out


def read_cmmlu(paths: Sequence[str | Path]) -> Converted:
    """CMMLU CSV `,Question,A,B,C,D,Answer`; path = [subject from `<subject>.csv`]."""
    out = Converted()
    for key, path in each_file(paths, "cmmlu", out):
        subject = subject_of(path.stem)
        table = csv_table(path)
        q_col, ans_col = table.column("Question"), table.column("Answer")
        opt_cols = [table.column(letter) for letter in "ABCD"]
        for line, row in table.data():
            answer, problem = letter_answer(row[ans_col])
            out.take(key, path, line, Candidate(
                id=row_id("cmmlu", key, line), question=row[q_col], options=[row[i] for i in opt_cols],
                answer=answer, answer_problem=problem, meta_info=f"cmmlu:{key}",
                path=[subject] if subject else []))
    return out


# --------------------------------------------------------------------------- generic layouts

@dataclass
class FieldMapping:
    """Which fields of a generic JSONL/CSV file hold what. Give `option_fields` or `options_field`."""

    question: str = "question"
    option_fields: list[str] = field(default_factory=list)  # one field per option, in order
    options_field: str | None = None  # one field: {"A": ...}, a list, or "A xxx" lines
    answer: str = "answer"
    answer_format: str = "letter"  # letter | index0 | index1 | text
    id_field: str | None = None  # ids from this field instead of <format>-<file>-<line>
    path_fields: list[str] = field(default_factory=list)
    explanation: str | None = None

    def __post_init__(self):
        if bool(self.option_fields) == bool(self.options_field):
            raise ValueError("give exactly one of option_fields and options_field")
        if self.answer_format not in ANSWER_FORMATS:
            raise ValueError(f"answer_format must be one of {', '.join(ANSWER_FORMATS)}")


def mapped_candidate(fmt: str, key: str, path: Path, line: int, get: Callable[[str], Any],
                     m: FieldMapping) -> Candidate:
    """A candidate from one generic row; `get(name)` returns a field's value (None when absent)."""
    if m.options_field:
        options = options_from_value(get(m.options_field), path, line, m.options_field)
    else:
        options = [text_of(get(f), path, line, f) for f in m.option_fields]
    raw = get(m.answer)
    if m.answer_format == "letter":
        answer, problem = letter_answer(raw)
    elif m.answer_format == "text":
        answer, problem = text_answer(raw, options)
    else:
        answer, problem = index_answer(raw, 0 if m.answer_format == "index0" else 1)
    if m.id_field:
        qid = text_of(get(m.id_field), path, line, m.id_field)
        if not qid:
            raise InputError(path, f'empty id in "{m.id_field}"', line)
    else:
        qid = row_id(fmt, key, line)
    extra = {}
    if m.explanation and (exp := text_of(get(m.explanation), path, line, m.explanation)):
        extra["explanation"] = exp
    return Candidate(id=qid, question=text_of(get(m.question), path, line, m.question), options=options,
                     answer=answer, answer_problem=problem, meta_info=f"{fmt}:{key}", extra=extra,
                     path=path_from_values([text_of(get(f), path, line, f) for f in m.path_fields]))


def read_jsonl(paths: Sequence[str | Path], mapping: FieldMapping) -> Converted:
    """Any JSONL of questions, fields named by `mapping`. A row without the question or an
    option field is a broken file; one without the answer field has no answer."""
    out = Converted()
    required = [mapping.question] + (mapping.option_fields or [mapping.options_field])
    if mapping.id_field:
        required.append(mapping.id_field)
    for key, path in each_file(paths, "jsonl", out):
        for line, obj in jsonl_rows(path):
            for name in required:
                if name not in obj:
                    raise InputError(path, f'missing field "{name}"', line)
            out.take(key, path, line, mapped_candidate("jsonl", key, path, line, obj.get, mapping))
    return out


def read_csv(paths: Sequence[str | Path], mapping: FieldMapping) -> Converted:
    """Any CSV of questions with a header row; every mapped column must exist."""
    out = Converted()
    for key, path in each_file(paths, "csv", out):
        table = csv_table(path)
        names = ([mapping.question, mapping.answer] + (mapping.option_fields or [mapping.options_field])
                 + ([mapping.id_field] if mapping.id_field else []) + mapping.path_fields
                 + ([mapping.explanation] if mapping.explanation else []))
        cols = {name: table.column(name) for name in names}
        for line, row in table.data():
            get = lambda name, row=row: row[cols[name]]  # noqa: E731
            out.take(key, path, line, mapped_candidate("csv", key, path, line, get, mapping))
    return out
