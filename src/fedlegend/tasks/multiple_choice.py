"""Multiple choice (MMLU): the question with lettered options as an instruction, trained on the
answer letter, scored as the standard MMLU harnesses do: the log-likelihood of each option
letter at the answer position, the most likely letter is the model's answer."""

from __future__ import annotations

import torch

from ..data import Encoded, LMInfo, collate_lm, encode_prompt_answer, lm_eval_batches
from ..errors import UserError
from ..execution import model_device, to_device
from ..lmdata import LETTERS
from .base import Score, Task
from .lm import answer_keep, answer_loss, causal_logits


def letter_ids(tokenizer, prefix: str) -> tuple[int, ...]:
    """The first token of each option letter as it follows the prompt; they must differ."""
    ids = tuple(int(tokenizer(prefix + x, add_special_tokens=False)["input_ids"][0]) for x in LETTERS)
    if len(set(ids)) != len(ids):
        raise UserError(f"the tokenizer gives the option letters {list(LETTERS)} the same first token {ids}; "
                        "multiple choice needs a tokenizer that tells them apart")
    return ids


class MultipleChoice(Task):
    name = "multiple-choice"

    def encode(self, tokenizer, ds, idx, max_length) -> Encoded:
        # A chat model answers in its own turn ("B"); a plain LM continues "Answer:" with " B".
        chat = bool(getattr(tokenizer, "chat_template", None))
        prompts = [ds.prompts[i] if chat else ds.prompts[i] + "\nAnswer:" for i in idx]
        answers = [ds.answers[i] if chat else " " + ds.answers[i] for i in idx]
        info = LMInfo(choice_ids=letter_ids(tokenizer, "" if chat else " "))
        return encode_prompt_answer(tokenizer, prompts, answers, [ds.labels[i] for i in idx],
                                    [ds.golds[i] for i in idx], max_length, info)

    def batch(self, data, idx, pad_id):
        return collate_lm([data.ids[i] for i in idx], [int(data.answer_start[i]) for i in idx], pad_id)

    def loss(self, model, batch):
        return answer_loss(model, batch)

    def output_positions(self, batch):
        return answer_keep(batch["labels"])

    @torch.no_grad()
    def score(self, model, data, batch_size, pad_id):
        device = model_device(model)
        choices = torch.tensor(data.lm.choice_ids, device=device)
        correct, loss_sum = 0, 0.0
        for idx, batch in lm_eval_batches(data, batch_size, pad_id, prompts_only=True):
            batch = to_device(batch, device)
            logp = torch.log_softmax(causal_logits(model, batch, 1)[:, -1].float(), dim=-1)
            gold = torch.tensor([LETTERS.index(data.golds[i]) for i in idx], device=device)
            pred = logp[:, choices].argmax(-1)
            correct += int((pred == gold).sum())
            loss_sum -= float(logp[torch.arange(len(idx), device=device), choices[gold]].sum())
        return Score(correct / len(data), loss_sum / len(data))
