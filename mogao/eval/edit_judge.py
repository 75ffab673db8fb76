"""Judging one turn of a multi-turn edit ("draw X", then "now make it ..."): parse the image before and after the
instruction with the shapes judge and check that the instructed change happened and nothing else changed.

The change comes from the turn's op record (`mogao.data.builtin.shapes`: recolour, reshape, resize, move,
remove, add, with the target and result objects). The target is found in the parsed *before* image - the
object of the named colour and shape, or the only object when the instruction says "it" - so a turn is judged
against what the image actually showed, not against the reference scene. When the earlier image shows nothing
the instruction could apply to, the turn fails (an empty image must not earn "kept" for free).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from mogao.data.builtin.shapes import CENTRE
from mogao.eval.shapes_judge import Detected, Parsed

JUDGE_DESCRIPTION = (
    "interleaved judge: both images parsed by the shapes judge; the instruction's target is found in the image "
    "before the turn (named colour and shape, or the only object for 'it'); changed = the target now shows the "
    "instructed colour/shape/size/cell (or is gone / was added); kept = the target is still there with every "
    "other attribute unchanged, every other object is unchanged and nothing else appeared; correct = both; a turn whose earlier "
    "image shows no object, or not the named target, fails all three"
)

Key = tuple[str, Any, str, str]


@dataclass(frozen=True)
class EditVerdict:
    """The judgement of one turn."""

    target_found: bool
    changed: bool
    kept: bool

    @property
    def correct(self) -> bool:
        return self.changed and self.kept


def _key(obj: dict[str, Any]) -> Key:
    return (obj["colour"], obj["shape"], obj["size"], obj["cell"] or CENTRE)


def _find_target(before: Parsed, target: dict[str, Any], pronoun: bool) -> Detected | None:
    if pronoun and len(before.objects) == 1:
        return before.objects[0]
    named = [o for o in before.objects if (o.colour, o.shape) == (target["colour"], target["shape"])]
    if not named:
        return None
    where = target["cell"] or CENTRE
    return next((o for o in named if o.where == where), named[0])


_EDITED = {"recolour": 0, "reshape": 1, "resize": 2, "move": 3}  # index of the edited field in a key


def _changed_key(key: Key, op: dict[str, Any]) -> Key:
    colour, shape, size, where = key
    result = op["result"]
    kind = op["op"]
    if kind == "recolour":
        colour = result["colour"]
    elif kind == "reshape":
        shape = result["shape"]
    elif kind == "resize":
        size = result["size"]
    elif kind == "move":
        where = result["cell"] or CENTRE
    else:
        raise ValueError(f"op {kind!r} does not change an object")
    return (colour, shape, size, where)


def judge_edit(before: Parsed, after: Parsed, op: dict[str, Any], *, pronoun: bool = False) -> EditVerdict:
    """Judge the turn that applied `op` (an op record of the shapes world) to the image parsed as `before`,
    giving the image parsed as `after`. `pronoun`: the instruction called the target "it" (a one-object scene)."""
    have_before, have_after = before.keys(), after.keys()
    kind = op["op"]
    if not before.objects:  # nothing recognisable to keep or to change: the turn cannot have succeeded
        return EditVerdict(False, False, False)
    if kind == "add":
        new = _key(op["result"])
        others = have_before
        after_others = have_after - Counter([new])
        return EditVerdict(True, have_after[new] > have_before[new], after_others == others)
    target = _find_target(before, op["target"], pronoun)
    if target is None:  # the instruction names nothing the image shows: "kept" is not granted for free
        return EditVerdict(False, False, False)
    others = have_before - Counter([target.key])
    if kind == "remove":
        changed = have_after[target.key] < have_before[target.key]
        return EditVerdict(True, changed, have_after - Counter([target.key]) == others)
    new = _changed_key(target.key, op)
    changed = have_after[new] > others[new]
    # The target must still be there, agreeing with its old self on every attribute but the edited one (with
    # whatever value that one has); set it aside, and everything else must be as before.
    edited = _EDITED[kind]
    same_but_edited = [k for k in have_after if all(a == b for i, (a, b) in enumerate(zip(k, target.key))
                                                    if i != edited)]
    if not same_but_edited:
        return EditVerdict(True, changed, False)
    shown = new if changed else same_but_edited[0]
    return EditVerdict(True, changed, have_after - Counter([shown]) == others)
