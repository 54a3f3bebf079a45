"""Log-probabilities from an OpenAI-compatible server: the teacher's targets and a served model's scores
without its weights on this machine.

Two requests, both through `atkd.api.ChatAPI` (its concurrency, retries and stop-on-failure; results
are yielded as they arrive, so a stage logs each one at once and a kill loses only those in flight):

- **Letters at the answer position** (`served_letter_logprobs_each`, `served_option_scores_each`):
  one chat-completions request per question, the same user message the local path renders
  (`prompts.mcq_user_text`), `max_tokens=1`, temperature 0, `logprobs=true`,
  `top_logprobs=min(k, cap)` (hosted APIs allow at most 20). The returned top tokens are mapped to
  option letters (`letter_logprobs_from_top`; the rule for letters outside the top-k is there).
  Every engine that implements chat logprobs returns these (vLLM, SGLang, llama.cpp, hosted APIs).
- **Prompt log-probs** for token-level targets (`served_prompt_targets_each`): the rendered prompt +
  response scored in one request, either through the legacy completions `echo=true` + `logprobs=k`
  (vLLM, SGLang, llama-cpp-python; hosted chat APIs have no equivalent), or vLLM's
  `prompt_logprobs=k` extension (`mode="prompt_logprobs"`: the prompt sent as token ids, the answer
  keyed by token id, nothing to re-tokenize). Each position's top-k is aligned to the training token
  ids; an item that does not align gets None (the caller keeps its option-level target and counts it).

**llama-cpp-python's echo is off by one position when the prompt does not start with BOS**
(0.3.36, `Llama._create_completion`): it pairs the echoed tokens (a leading BOS removed) with the
logits rows from row 0. With a BOS first, token i is read from the row after token i-1 (right);
without one (a template that writes no BOS and a GGUF that adds none: Qwen's), token i is read from
the row after token i itself, the distribution of the NEXT token, and the generated token's entry is
lost. The first echoed entry is null either way, so it cannot tell the two apart: `echo_shift` asks
the plain completion of a prompt (the generated token's logprobs are right on every engine) and finds
which echoed entry holds the same top-k; `served_prompt_targets_each` takes that `shift`.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Iterator

from .api import APIError, ChatAPI
from .errors import InputError
from .scoring import OptionScores

log = logging.getLogger(__name__)

# Hosted APIs (OpenAI and those following it) refuse top_logprobs above 20; vLLM's own default
# limit (--max-logprobs) is 20 too. Asking more than the cap is never sent.
DEFAULT_TOP_LOGPROBS = 20
# Top-k dicts that agree to this many nats are the same distribution (float32 engines agree to ~1e-5).
SAME_DISTRIBUTION_NATS = 1e-3
# Markers some servers leave on raw token strings for a leading space (byte-level BPE, SentencePiece).
_SPACE_MARKERS = ("Ġ", "▁")
_CLIENT_ERROR = re.compile(r"HTTP 4\d\d\b")


class LogprobsRefused(APIError):
    """The server answered a logprobs request with a client error (a limit on top_logprobs, logprobs off)."""


def asked_top_k(top_k: int, cap: int) -> int:
    """The top_logprobs actually asked: `top_k` lowered to `cap` (the setting's limit), at least 1."""
    if cap < 1 or top_k < 1:
        raise InputError("top_logprobs", f"must be at least 1 (asked {top_k}, cap {cap})")
    if top_k > cap:
        log.info("top_logprobs %d lowered to the cap %d", top_k, cap)
    return min(top_k, cap)


def letter_of(token_text: str, letters: list[str]) -> str | None:
    """The option letter a returned token spells, or None: the token's text with leading/trailing
    whitespace (and a raw "Ġ"/"▁" space marker) removed must be exactly one of `letters`
    ("A", " A", "ĠA" are A; "A.", "a", "(A" are no letter)."""
    text = token_text
    for marker in _SPACE_MARKERS:
        if text.startswith(marker):
            text = " " + text[len(marker):]
    text = text.strip()
    return text if text in letters else None


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    if top == -math.inf:
        return -math.inf
    return top + math.log(sum(math.exp(v - top) for v in values))


@dataclass
class LetterLogprobs:
    """What one answer-position top-k says about the option letters (full-vocabulary natural logs)."""

    present: dict[str, float]  # letters found in the top-k: log of the summed probability of their tokens
    absent: list[str]  # letters not in the top-k, in option order
    absent_logprob: float  # the value each absent letter gets (see `letter_logprobs_from_top`)
    kth_logprob: float  # the smallest returned log-prob: an upper bound for every token not returned
    top_mass: float  # summed probability of the returned tokens
    returned: int  # how many distinct tokens came back

    @property
    def tail_mass(self) -> float:
        """Probability outside the returned top-k (1 - their sum, at least 0)."""
        return max(0.0, 1.0 - self.top_mass)

    @property
    def letter_mass(self) -> float:
        """Probability of the letters found in the top-k: a lower bound of the true letter mass (absent
        letters are tail and add nothing)."""
        return sum(math.exp(v) for v in self.present.values())

    def option_logprobs(self, letters: list[str]) -> dict[str, float]:
        """The option-level target: log-probs over `letters` summing to 1 (present letters exact up to
        renormalisation, absent ones at `absent_logprob`)."""
        raw = [self.present.get(L, self.absent_logprob) for L in letters]
        norm = _logsumexp(raw)
        if norm == -math.inf:  # no letter at all and an empty tail: nothing to say, uniform
            return {L: -math.log(len(letters)) for L in letters}
        return {L: v - norm for L, v in zip(letters, raw)}

    def option_scores(self, letters: list[str]) -> OptionScores:
        """The same object the local score mode gives (`atkd.scoring.OptionScores`)."""
        logprobs = self.option_logprobs(letters)
        best = max(logprobs.values())
        tied = sum(v == best for v in logprobs.values()) > 1
        return OptionScores(logprobs=logprobs, letter_mass=self.letter_mass, tied=tied)


def letter_logprobs_from_top(top: list[tuple[str, float]], letters: list[str]) -> LetterLogprobs:
    """Map one position's returned top-k (token text, log-prob) to the option letters.

    The rule:
    - a token spells a letter when its text, stripped of whitespace (and a raw "Ġ"/"▁" marker), is
      exactly that letter (`letter_of`); several tokens spelling the same letter ("A" and " A") are
      summed (log-sum-exp): the letter's log-prob is that of the answer being that letter;
    - a letter none of whose tokens is returned is **absent**: each of its tokens has at most the
      k-th (smallest) returned log-prob `kth`, so `kth` is an upper bound of each such token. The
      absent letter is treated as part of the tail: it adds nothing to `letter_mass` (a lower
      bound), and for the option-level target it gets `min(kth, log(tail / n_absent))`, where tail
      = 1 - sum of the returned probabilities: never above the k-th value, and the absent letters
      together never above the tail mass, which stays as given (the returned top-k are not changed).
      The option-level target is then these values renormalised over the item's options: exact
      ratios among present letters, an absent letter's share at most what its bound allows;
    - with no letter returned at all, every letter gets the same value: uniform, `tied`.
    Returned tokens with a null log-prob, and repeats of the same token text (engines that key the
    top-k by text keep one), count once.
    """
    seen: dict[str, float] = {}
    for text, lp in top:
        if lp is not None and text not in seen:
            seen[text] = float(lp)
    if not seen:
        raise APIError("the server returned no top_logprobs at the answer position")
    by_letter: dict[str, list[float]] = {}
    for text, lp in seen.items():
        letter = letter_of(text, letters)
        if letter is not None:
            by_letter.setdefault(letter, []).append(lp)
    present = {L: _logsumexp(v) for L, v in by_letter.items()}
    absent = [L for L in letters if L not in present]
    kth = min(seen.values())
    top_mass = min(1.0, sum(math.exp(v) for v in seen.values()))
    tail = max(0.0, 1.0 - top_mass)
    shared = math.log(tail / len(absent)) if absent and tail > 0 else -math.inf
    return LetterLogprobs(present=present, absent=absent, absent_logprob=min(kth, shared), kth_logprob=kth,
                          top_mass=top_mass, returned=len(seen))


# ------------------------------------------------------------------ the answer position (chat completions)

def letter_payload(model: str, messages: list[dict], top_k: int) -> dict:
    """One chat-completions request for the first reply token's top-k."""
    return {"model": model, "messages": messages, "max_tokens": 1, "temperature": 0.0, "logprobs": True,
            "top_logprobs": top_k}


def chat_top_logprobs(response: dict, source: str) -> list[tuple[str, float]]:
    """(token, log-prob) pairs of the first generated token's top_logprobs in a chat-completions answer."""
    try:
        first = response["choices"][0]["logprobs"]["content"][0]
        return [(t["token"], t["logprob"]) for t in first["top_logprobs"]]
    except (KeyError, IndexError, TypeError):
        raise APIError(f"{source}: the answer holds no logprobs.content[0].top_logprobs (the server ignores "
                       f"logprobs; score this model in generate mode): {str(response)[:300]}") from None


def _refused(err: APIError, base_url: str, what: str) -> APIError:
    """A refused logprobs request as one message that names the server's own words: a client error (a
    limit on top_logprobs: "must be <= 20"), or any error whose text is about logprobs (llama-cpp-python
    started with logits_all off answers 500 "logprobs is not supported ...")."""
    if not (_CLIENT_ERROR.search(str(err)) or "logprob" in str(err).lower()):
        return err
    return LogprobsRefused(f"{base_url}: the server refused {what}: {err}. Lower the top-k cap to the "
                           "limit it names, or score this model in generate mode")


def served_letter_logprobs_each(api: ChatAPI, conversations: list[list[dict]], letters: list[list[str]],
                                top_k: int = DEFAULT_TOP_LOGPROBS, cap: int = DEFAULT_TOP_LOGPROBS
                                ) -> Iterator[tuple[int, LetterLogprobs]]:
    """(index, LetterLogprobs) per conversation, as the answers arrive (`ChatAPI.post_each`).

    `letters[i]` are conversation i's option letters. A server that refuses the request raises
    `LogprobsRefused` naming its message (e.g. a top_logprobs limit)."""
    k = asked_top_k(top_k, cap)
    payloads = [letter_payload(api.model, messages, k) for messages in conversations]
    try:
        for i, response in api.post_each("/chat/completions", payloads):
            yield i, letter_logprobs_from_top(chat_top_logprobs(response, api.base_url), letters[i])
    except APIError as err:
        raise _refused(err, api.base_url, f"logprobs with top_logprobs={k}") from None


def mcq_messages(question, lang: str) -> list[dict]:
    """The conversation the local score mode renders for `question` (`prompts.mcq_prompt`): one user turn."""
    from .prompts import mcq_user_text

    return [{"role": "user", "content": mcq_user_text(question, lang)}]


def served_option_scores_each(api: ChatAPI, questions: list, lang: str, top_k: int = DEFAULT_TOP_LOGPROBS,
                              cap: int = DEFAULT_TOP_LOGPROBS) -> Iterator[tuple[int, OptionScores, LetterLogprobs]]:
    """Score mode at an endpoint: (index, OptionScores, LetterLogprobs) per question (`atkd.records.Question`),
    as they arrive; OptionScores is what the local `scoring.score_questions` gives, its `letter_mass` the
    present letters' (a lower bound)."""
    conversations = [mcq_messages(q, lang) for q in questions]
    for i, letter_lp in served_letter_logprobs_each(api, conversations, [q.letters for q in questions], top_k, cap):
        yield i, letter_lp.option_scores(questions[i].letters), letter_lp


# ------------------------------------------------------------------ prompt log-probs (completions)

@dataclass
class TokenTargets:
    """Token-level targets of one item at its target positions, in the store's terms."""

    ids: list[list[int]]  # per position: the top-k token ids (those whose text maps to one id)
    logprobs: list[list[float]]  # their full-vocabulary log-probs, descending
    tail_logprobs: list[float]  # log of 1 - their summed probability (unmapped returned tokens are tail too)


def lossy_text(text: str) -> str:
    """A token's text as servers key their top-k by it: without the U+FFFD of bytes that are not a whole
    character (llama-cpp-python decodes with errors="ignore"; others print "\ufffd")."""
    return text.replace("\ufffd", "")


def token_text_ids(tokenizer) -> dict[str, int]:
    """Each single token's text (`lossy_text` of its decoding) -> its id, for texts exactly one token has.

    A token holding a whole character and a few bytes of the next one ("ー" + 2 bytes) has the same
    lossy text as the token of the character alone ("ー"): such texts are left out, and what the
    server returns under them stays in the tail (assigning it to either id could be wrong)."""
    n = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    out: dict[str, int] = {}
    dup: set[str] = set()
    for i, t in enumerate(texts):
        t = lossy_text(t)
        if t in out:
            dup.add(t)
        out[t] = i
    for t in dup:
        del out[t]
    return out


def special_token_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's special tokens (BOS, end of turn, template markers)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {int(i) for i, t in added.items() if getattr(t, "special", False)}


def sequence_text(tokenizer, ids: list[int]) -> str:
    """The text a server must tokenize back into `ids`: the ids decoded with special tokens kept, minus
    the leading BOS text when the tokenizer adds BOS itself (the server adds it then; sent twice, the
    model would see two BOS)."""
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    bos = tokenizer.bos_token
    adds_bos = bool(bos) and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
    if adds_bos and ids[:1] == [tokenizer.bos_token_id] and text.startswith(bos):
        text = text[len(bos):]
    return text


def echo_payload(model: str, text: str, top_k: int) -> dict:
    return {"model": model, "prompt": text, "max_tokens": 1, "temperature": 0.0, "echo": True, "logprobs": top_k}


def prompt_logprobs_payload(model: str, ids: list[int], top_k: int) -> dict:
    """vLLM's extension: the prompt as token ids (no re-tokenizing, no BOS added), top-k at every prompt token."""
    return {"model": model, "prompt": list(ids), "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": top_k}


def echo_entries(response: dict, source: str) -> tuple[list[str], list[dict | None]]:
    """(token texts, top-k dicts) of every echoed entry of a completions answer, in order."""
    try:
        lp = response["choices"][0]["logprobs"]
        return list(lp["tokens"]), list(lp["top_logprobs"])
    except (KeyError, IndexError, TypeError):
        raise APIError(f"{source}: the completions answer holds no echoed logprobs (tokens/top_logprobs): "
                       f"{str(response)[:300]}") from None


def echoed_prompt(tokenizer, ids: list[int], tokens: list[str], tops: list[dict | None]
                  ) -> tuple[list[int], list[dict | None]] | None:
    """(the prompt's ids as echoed, their entries), or None when the server's tokens are not `ids`.

    Matched from the start: engines leave a leading BOS out of the echo (llama-cpp-python does), so
    `ids` without it must be spelled by the first echoed tokens, one for one (the server tokenized the
    text into the same tokens). What follows them (the generated token) is dropped. The number of
    entries is not always prompt + generated: llama-cpp-python pairs tokens with logits rows and
    stops at the shorter list, which without a BOS loses the generated token."""
    seq = ids[1:] if ids[:1] == [tokenizer.bos_token_id] else list(ids)
    if len(tokens) < len(seq) - 1:
        return None
    n = min(len(tokens), len(seq))
    pieces = tokenizer.batch_decode([[i] for i in seq[:n]], skip_special_tokens=False,
                                    clean_up_tokenization_spaces=False)
    special = special_token_ids(tokenizer)
    for echoed, piece, tid in zip(tokens[:n], pieces, seq[:n]):
        # llama-cpp-python echoes special tokens (<|eot_id|>) as "": it detokenizes without them
        if echoed != piece and not (echoed == "" and tid in special):
            return None
    return seq, tops[:n]


def align_echo(tokenizer, ids: list[int], first: int, tokens: list[str], tops: list[dict | None], shift: int,
               text_ids: dict[str, int], k: int) -> TokenTargets | None:
    """Targets for the tokens ids[first:] from echoed entries, or None when they do not align
    (`echoed_prompt`). The distribution before ids[t] is the entry of ids[t - shift] (`shift` 1:
    llama-cpp-python without a BOS)."""
    echoed = echoed_prompt(tokenizer, ids, tokens, tops)
    if echoed is None:
        return None
    seq, entries = echoed
    lead = len(ids) - len(seq)  # 1 when a BOS was left out of the echo
    out = TokenTargets(ids=[], logprobs=[], tail_logprobs=[])
    for t in range(first, len(ids)):
        at = t - lead - shift
        top = entries[at] if 0 <= at < len(entries) else None
        if not top:
            return None
        pairs = sorted(((text_ids[lossy_text(s)], float(v)) for s, v in top.items()
                        if lossy_text(s) in text_ids and v is not None), key=lambda p: -p[1])
        _add_position(out, pairs, k)
    return out


def align_prompt_logprobs(ids: list[int], first: int, rows: list[dict | None], k: int) -> TokenTargets | None:
    """Targets for ids[first:] from vLLM's `prompt_logprobs` (one row per prompt token, keyed by token id)."""
    if len(rows) != len(ids):
        return None
    out = TokenTargets(ids=[], logprobs=[], tail_logprobs=[])
    for t in range(first, len(ids)):
        row = rows[t]
        if not row:
            return None
        pairs = sorted(((int(k), float(v["logprob"] if isinstance(v, dict) else v)) for k, v in row.items()),
                       key=lambda p: -p[1])
        _add_position(out, pairs, k)
    return out


def _add_position(out: TokenTargets, pairs: list[tuple[int, float]], k: int) -> None:
    """One position's k best (id, log-prob) pairs (engines add the actual token to its top-k when it is not
    in it), and its tail: the probability they leave out."""
    pairs = pairs[:k]
    mass = min(1.0, sum(math.exp(v) for _, v in pairs))
    out.ids.append([i for i, _ in pairs])
    out.logprobs.append([v for _, v in pairs])
    out.tail_logprobs.append(math.log(1.0 - mass) if mass < 1.0 else -math.inf)


def served_prompt_targets_each(api: ChatAPI, tokenizer, items: list[tuple[list[int], int]],
                               top_k: int = DEFAULT_TOP_LOGPROBS, cap: int = DEFAULT_TOP_LOGPROBS,
                               mode: str = "echo", shift: int = 0) -> Iterator[tuple[int, TokenTargets | None]]:
    """(index, TokenTargets or None) per item, as the answers arrive.

    An item is (ids, first): the training sequence's token ids (prompt ids + response ids, the
    `atkd.sequence.TrainSequence` ones, end of turn included) and the index of the first token to take
    a target for (the store's token rows start after the answer letter: len(prompt_ids) + 1). Position
    t's target is the top-k of the distribution BEFORE ids[t], like the local teacher's logits at t - 1.
    `mode`: "echo" (completions echo + logprobs, the text re-tokenized by the server and aligned back,
    `shift` from `echo_shift`) or "prompt_logprobs" (vLLM's extension, token ids in and out).
    None: the server's tokens do not match `ids` there (the item keeps its option-level target).
    """
    k = asked_top_k(top_k, cap)
    if mode == "echo":
        text_ids = token_text_ids(tokenizer)
        payloads = [echo_payload(api.model, sequence_text(tokenizer, ids), k) for ids, _ in items]
    elif mode == "prompt_logprobs":
        payloads = [prompt_logprobs_payload(api.model, ids, k) for ids, _ in items]
    else:
        raise InputError("prompt log-prob mode", f"unknown {mode!r}; choose echo or prompt_logprobs")
    try:
        for i, response in api.post_each("/completions", payloads):
            ids, first = items[i]
            if mode == "echo":
                tokens, tops = echo_entries(response, api.base_url)
                yield i, align_echo(tokenizer, ids, first, tokens, tops, shift, text_ids, k)
            else:
                rows = (response.get("choices") or [{}])[0].get("prompt_logprobs")
                if rows is None:
                    raise APIError(f"{api.base_url}: no prompt_logprobs in the answer (not a vLLM server?)")
                yield i, align_prompt_logprobs(ids, first, rows, k)
    except APIError as err:
        raise _refused(err, api.base_url, f"prompt log-probs ({mode}, {k} per token)") from None


def _same_top(a: dict | None, b: dict | None) -> bool:
    """Whether two top-k dicts (text -> log-prob) describe the same distribution (their 3 best agree)."""
    if not a or not b:
        return False
    best = sorted(a, key=lambda s: -a[s])[:3]
    return all(s in b and abs(a[s] - b[s]) <= SAME_DISTRIBUTION_NATS for s in best)


def echo_shift(api: ChatAPI, tokenizer, prompt_ids: list[int], top_k: int = 5) -> int:
    """0 when the server's echo reports each prompt token's log-prob from the distribution before it,
    1 when from the distribution after it (llama-cpp-python without a leading BOS).

    Asks the plain completion of the prompt (its generated token's top-k: right on every engine), then
    echoes the prompt + that token: the echo's entry for the appended token must hold the same top-k
    (shift 0), or the entry of the last prompt token does (shift 1). `prompt_ids` is a prompt rendered
    as the training prompts are (its text is sent as `sequence_text` sends theirs)."""
    text = sequence_text(tokenizer, prompt_ids)
    plain = api._post({"model": api.model, "prompt": text, "max_tokens": 1, "temperature": 0.0,
                       "logprobs": top_k}, path="/completions")
    try:
        choice = plain["choices"][0]
        generated, after_prompt = choice["text"], choice["logprobs"]["top_logprobs"][0]
    except (KeyError, IndexError, TypeError):
        raise APIError(f"{api.base_url}: no completion logprobs: {str(plain)[:300]}") from None
    tokens, tops = echo_entries(api._post(echo_payload(api.model, text + generated, top_k), path="/completions"),
                                api.base_url)
    echoed = echoed_prompt(tokenizer, prompt_ids, tokens, tops)
    if echoed is None:
        raise APIError(f"{api.base_url}: the echoed tokens are not the prompt's; cannot align prompt log-probs")
    n = len(echoed[0])  # the appended token's entry is tops[n]
    if len(tops) > n and _same_top(after_prompt, tops[n]):
        return 0
    if _same_top(after_prompt, tops[n - 1]):
        return 1
    raise APIError(f"{api.base_url}: the echo's log-probs match the completion's at neither the appended token "
                   "nor the one before it; cannot align prompt log-probs from this server")
