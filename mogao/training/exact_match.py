"""Exact-match validation: greedy answers to validation samples that end in an answer after a prompt, generated
through the generation loop users get (`mogao.inference.tasks`), compared with the reference after
`normalise_answer`. A stage module adds it (`configure_callbacks`) when its `exact_match_samples` is above 0."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torchmetrics import SumMetric

from mogao.data.samples import ImageSegment, Sample, TextSegment
from mogao.errors import ConfigError
from mogao.inference.inputs import check_prompt


def normalise_answer(text: str) -> str:
    """"  The  Red." -> "the red": strip, lower-case, drop a trailing full stop, collapse whitespace."""
    return " ".join(text.strip().lower().rstrip(".").split())


def question_answer(sample: Sample) -> tuple[list[dict], str] | None:
    """(context segments, answer) when the sample ends in loss-bearing text after a prompt and has no targets."""
    segs = sample.segments
    if len(segs) < 2 or sample.has_target:
        return None
    last = segs[-1]
    if not isinstance(last, TextSegment) or not last.loss:
        return None
    if any(isinstance(s, TextSegment) and s.loss for s in segs[:-1]):
        return None
    ctx = [{"text": s.text, "loss": False} if isinstance(s, TextSegment) else {"image": s.image}
           for s in segs[:-1] if isinstance(s, (TextSegment, ImageSegment))]
    try:  # a prompt the generation loop refuses (only whitespace, control characters) is not asked
        for c in ctx:
            if "text" in c:
                check_prompt(c["text"])
    except ConfigError:
        return None
    return ctx, last.text


class ExactMatch(pl.Callback):
    """Logs `val/<source>/exact_match` at the end of every validation, over the first `samples` question-answer
    samples of each validation source of the data module."""

    def __init__(self, samples: int) -> None:
        self.samples = samples

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = getattr(trainer, "datamodule", None)
        if self.samples <= 0 or dm is None or not hasattr(dm, "val_samples"):
            return
        from mogao.inference import tasks
        from mogao.inference.session import GenerationConfig

        out = {}
        rank, world = trainer.global_rank, trainer.world_size
        for name in dm.val_names:
            qa = [x for x in map(question_answer, dm.val_samples(name)) if x is not None][: self.samples]
            correct, total = SumMetric().to(pl_module.device), SumMetric().to(pl_module.device)
            if qa:
                # every rank decodes as many questions for as many steps (a sharded model's forward is a
                # collective): its share, padded with repeats that are not counted
                steps = max(len(pl_module.tokenizer(a)["input_ids"]) for _, a in qa) + 2
                share = qa[rank::world]
                counted = len(share)
                share = share + [qa[0]] * (-(-len(qa) // world) - counted)
                # greedy; images on the token grid the validation data has (the data's max_image_tokens), not
                # the default generation grid; lockstep: as many forwards on every rank
                config = GenerationConfig(max_new_tokens=steps, max_images=0, lockstep=world > 1,
                                          condition_tokens=dm.data.max_image_tokens)
                answers = tasks.text_replies(pl_module.model, pl_module.tokenizer, [c for c, _ in share],
                                             config=config)
                hits = sum(normalise_answer(g) == normalise_answer(a)
                           for g, (_, a) in list(zip(answers, share))[:counted])
                correct.update(torch.tensor(float(hits)))
                total.update(torch.tensor(float(counted)))
            else:
                correct.update(torch.tensor(0.0))
                total.update(torch.tensor(0.0))
            n = total.compute()
            if n > 0:
                out[f"val/{name}/exact_match"] = correct.compute() / n
        if out:
            pl_module.log_dict(out, batch_size=1, sync_dist=False)
