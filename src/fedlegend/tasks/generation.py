"""Generation (math word problems): trained on problem + worked solution (loss on the solution
and its end of turn), scored by greedy generation (batched, left-padded, data.max_new_tokens new
tokens at most) and exact match of the final number. A generation with no number is a miss."""

from __future__ import annotations

import torch

from ..data import Encoded, LMInfo, collate_lm, encode_prompt_answer, lm_eval_batches
from ..execution import model_device, to_device
from ..numbers import final_number, same_number
from .base import Score, Task
from .lm import answer_keep, answer_loss, end_of_turn_id


def until_stop(ids: list[int], stops: tuple[int, ...]) -> list[int]:
    for j, t in enumerate(ids):
        if t in stops:
            return ids[:j]
    return ids


class Generation(Task):
    name = "generation"

    def __init__(self, max_new_tokens: int = 64):
        self.max_new_tokens = max_new_tokens

    @classmethod
    def from_config(cls, data_cfg=None) -> "Generation":
        return cls(getattr(data_cfg, "max_new_tokens", 64))

    def encode(self, tokenizer, ds, idx, max_length) -> Encoded:
        chat = bool(getattr(tokenizer, "chat_template", None))
        end = end_of_turn_id(tokenizer)
        stops = tuple(sorted({t for t in (end, tokenizer.eos_token_id) if t is not None}))
        info = LMInfo(stop_ids=stops, decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
        prompts = [ds.prompts[i] if chat else ds.prompts[i] + "\n" for i in idx]
        return encode_prompt_answer(tokenizer, prompts, [ds.answers[i] for i in idx], [ds.labels[i] for i in idx],
                                    [ds.golds[i] for i in idx], max_length, info, end_id=end)

    def batch(self, data, idx, pad_id):
        return collate_lm([data.ids[i] for i in idx], [int(data.answer_start[i]) for i in idx], pad_id)

    def loss(self, model, batch):
        return answer_loss(model, batch)

    def output_positions(self, batch):
        return answer_keep(batch["labels"])

    def generate(self, model, data: Encoded, batch_size: int, pad_id: int) -> dict[int, str]:
        """Greedy completions of each example's prompt (text, up to its first stop token)."""
        device, stops, out = model_device(model), data.lm.stop_ids, {}
        for idx, batch in lm_eval_batches(data, batch_size, pad_id, prompts_only=True):
            batch = to_device(batch, device)
            gen = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad_id,
                                 eos_token_id=list(stops) or None)
            for i, row in zip(idx, gen[:, batch["input_ids"].shape[1]:].tolist()):
                out[i] = data.lm.decode(until_stop(row, stops))
        return out

    @torch.no_grad()
    def score(self, model, data, batch_size, pad_id):
        texts = self.generate(model, data, batch_size, pad_id)
        correct = sum(same_number(final_number(texts[i]), data.golds[i]) for i in range(len(data)))
        loss_sum, tokens, device = 0.0, 0, model_device(model)
        for _, batch in lm_eval_batches(data, batch_size, pad_id):   # teacher-forced loss on the answers
            batch = to_device(batch, device)
            loss_sum += float(answer_loss(model, batch, reduction="sum"))
            tokens += int((batch["labels"] != -100).sum())
        return Score(correct / len(data), loss_sum / max(tokens, 1))
