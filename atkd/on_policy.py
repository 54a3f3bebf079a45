"""On-policy practice (RESPONSES student | mixed): which items the student answered itself, and their sequence.

Step D4 (`atkd.student_sampling`) writes, on each item it chose for practice, the student's sampled
rationale reply and what it committed to. An item is *practised* when the reply's answer line
commits to one of the item's letters: steps E and F then use the student's own response instead
of the teacher's (`item_sequence`), and F trains it the GKD way (`atkd.kd_loss`): the teacher's
distribution at every token of the student's text, option-level KD at the letter, cross-entropy
only towards the labelled letter (never towards the student's sampled letter or its own tokens).
A chosen item whose reply commits to no letter is not practised: it keeps the teacher's response
and is counted (`unparsed` in D4's report).

The sequence is `atkd.sequence`'s, with the student's letter in the letter slot and its reason
(the reply's lines after the answer line) as the response text: the MCQ prompt, the sampled
letter, "\\n" + reason + end of turn. The MCQ prompt rather than the rationale prompt the reply
was sampled under, for the reason D3's teacher rationales use it (ARCHITECTURE.md §12): the
letter's signal lands where it is measured, and every kind of item shares one prompt.
"""

from __future__ import annotations

from dataclasses import replace

from .records import Question
from .sequence import TrainSequence, training_sequence

STUDENT_REPLY = "student_reply"  # the student's raw rationale reply (chosen items)
STUDENT_LETTER = "student_letter"  # the letter its answer line commits to, or null
STUDENT_CORRECT = "student_correct"  # whether that letter is the label (null when unparsed)
STUDENT_REASON = "student_reason"  # the reply after its answer line (practised items)


def practised_letter(q: Question) -> str | None:
    """The student's sampled letter when `q` is practised on-policy, else None."""
    letter = q.extra.get(STUDENT_LETTER)
    return letter if isinstance(letter, str) and letter in q.options else None


def item_sequence(tokenizer, q: Question, lang: str, response_field: str | None,
                  source: str = "dataset") -> TrainSequence:
    """The teacher-forced sequence of any training item: the student's own response for a practised item,
    else `atkd.sequence.training_sequence` with the teacher's response (`response_field`)."""
    letter = practised_letter(q)
    if letter is None:
        return training_sequence(tokenizer, q, lang, response_field, source)
    reason = q.extra.get(STUDENT_REASON) or ""
    own = replace(q, answer_idx=letter, extra={**q.extra, STUDENT_REASON: str(reason)})
    return training_sequence(tokenizer, own, lang, STUDENT_REASON, source)
