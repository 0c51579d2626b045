"""Text pairs and the classification datasets (issue 12, items 2, 3, 6): the pair encoding with the
real MiniLM tokenizer, segments through the encoder, TREC, VitaminC (from a stand-in BIG-bench
sdist), a user's file with two text columns, and its bad input named by file, line and field."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch

from fedlegend.assets import AssetError, resolve_model
from fedlegend.data import Encoded, collate, encode
from fedlegend.datasets import VITAMINC_MEMBER, TextDataset, resolve_dataset
from fedlegend.tasks.classification import Classification


@pytest.fixture(scope="module")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model("minilm-l6").path)


def test_pair_encoding_has_both_texts_and_their_segments(minilm_tokenizer):
    tok = minilm_tokenizer
    ds = TextDataset(["the quote from wikipedia", "a second quote"], [2, 0], ["True", "False", "Neither"],
                     ["the claim", "another claim"])
    enc = Classification().encode(tok, ds, [0, 1], max_length=64)
    ids, types = enc.ids[0], enc.type_ids[0]
    assert ids.count(tok.sep_token_id) == 2 and ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    first_sep = ids.index(tok.sep_token_id)
    # segment 0: [CLS] text [SEP]; segment 1: the claim and its [SEP]
    assert types == [0] * (first_sep + 1) + [1] * (len(ids) - first_sep - 1)
    assert tok.decode(ids[first_sep + 1 : -1]) == "the claim"
    assert enc.labels.tolist() == [2, 0]
    sub = enc.subset([1])
    assert sub.type_ids == [enc.type_ids[1]] and sub.ids == [enc.ids[1]]


def test_pair_truncation_cuts_the_longer_side(minilm_tokenizer):
    tok = minilm_tokenizer
    long_evidence = " ".join(["evidence"] * 100)
    enc = encode(tok, [long_evidence], [0], max_length=16, pairs=["short claim"])
    ids = enc.ids[0]
    assert len(ids) == 16
    assert tok.decode(ids[ids.index(tok.sep_token_id) + 1 : -1]) == "short claim"   # the claim survives whole


def test_single_texts_encode_as_before(minilm_tokenizer):
    """No pairs: exactly the ids of the plain tokenizer call and no segments (numbers unchanged)."""
    tok = minilm_tokenizer
    texts = ["a fine film", "a dull one , really"]
    enc = encode(tok, texts, [1, 0], max_length=8)
    assert enc.ids == list(tok(texts, truncation=True, max_length=8)["input_ids"]) and enc.type_ids is None
    batch = Classification().batch(enc, np.array([0, 1]), tok.pad_token_id)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}


def test_collate_pads_segments_with_zero():
    batch = collate([[5, 6, 7, 8], [5, 9]], np.array([0, 1]), pad_id=0, type_ids=[[0, 0, 1, 1], [0, 1]])
    assert batch["token_type_ids"].tolist() == [[0, 0, 1, 1], [0, 1, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_encoder_uses_the_segments():
    """The mean-pooling classifier hands token_type_ids to a BERT backbone: segment 1 changes the logits."""
    from transformers import BertConfig, BertModel

    from fedlegend.models.encoder import MeanPoolClassifier

    torch.manual_seed(0)
    backbone = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=32, max_position_embeddings=16))
    model = MeanPoolClassifier(backbone, num_labels=3, dropout=0.0).eval()
    data = Encoded([[1, 4, 2, 7, 2]], np.array([1]), type_ids=[[0, 0, 0, 1, 1]])
    with torch.no_grad():
        paired = model(**Classification().batch(data, np.array([0]), 0)).logits
        single = model(**Classification().batch(Encoded(data.ids, data.labels), np.array([0]), 0)).logits
    assert paired.shape == (1, 3) and not torch.allclose(paired, single)


# ---------------------------------------------------------------- user files
def test_user_file_with_two_text_columns_and_three_labels(tmp_path):
    p = tmp_path / "nli.csv"
    p.write_text("premise,hypothesis,label\nit rains,the street is wet,0\nit rains,the sun shines,2\n"
                 "a cat sleeps,an animal rests,0\na dog barks,a cat sleeps,1\nit rains,the street is wet,0\n")
    ds = resolve_dataset("file", str(p), text_column="premise", label_column="label", text_pair_column="hypothesis")
    assert ds.texts == ["it rains", "it rains", "a cat sleeps", "a dog barks"]      # the repeated pair kept once
    assert ds.pairs == ["the street is wet", "the sun shines", "an animal rests", "a cat sleeps"]
    assert ds.label_names == ["0", "1", "2"] and ds.labels == [0, 2, 0, 1]


def test_numeric_labels_sort_as_numbers(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"text": f"t{i}", "label": v}) + "\n" for i, v in enumerate([10, 2, 0, 2])))
    ds = resolve_dataset("file", str(p))
    assert ds.label_names == ["0", "2", "10"] and ds.labels == [2, 1, 0, 1]


@pytest.mark.parametrize("content, line, field", [
    ("premise,hypothesis,label\na,b,0\nc,,1\n", 3, "hypothesis"),                 # empty second text
    ("premise,hypothesis,label\na,b,0\n\nc,d,1\n  ,e,0\n", 5, "premise"),          # whitespace text, after a blank line
    ("premise,hypothesis,label\na,b,0\nc,d,\n", 3, "label"),                        # no label
    ("premise,hypothesis,label\na,b,0\nc,d,-1\n", 3, "label"),                      # not a class number
    ("premise,hypothesis,label\na,b,0\nc,d,1.5\n", 3, "label"),
    ('premise,hypothesis,label\na,b,0\n"multi\nline",d,1\ne,f,2.5\n', 5, "label"),  # a quoted field spans lines
])
def test_bad_pair_rows_name_file_line_and_field(tmp_path, content, line, field):
    p = tmp_path / "pairs.csv"
    p.write_text(content)
    with pytest.raises(AssetError) as err:
        resolve_dataset("file", str(p), text_column="premise", text_pair_column="hypothesis")
    msg = str(err.value)
    assert str(p) in msg and f"line {line}:" in msg and repr(field) in msg, msg


def test_bad_jsonl_row_counts_lines_as_the_file_does(tmp_path):
    p = tmp_path / "pairs.jsonl"
    p.write_text('{"text": "a", "pair": "b", "label": "x"}\n\n{"text": "c", "pair": "", "label": "y"}\n')
    with pytest.raises(AssetError, match=r"line 3: field 'pair' is empty"):
        resolve_dataset("file", str(p), text_pair_column="pair")


def test_missing_second_column_names_the_key(tmp_path):
    p = tmp_path / "single.csv"
    p.write_text("text,label\na,0\nb,1\n")
    with pytest.raises(AssetError) as err:
        resolve_dataset("file", str(p), text_pair_column="hypothesis")
    msg = str(err.value)
    assert str(p) in msg and "['hypothesis']" in msg and "data.text_pair_column" in msg, msg


def test_one_label_is_not_a_classifier(tmp_path):
    p = tmp_path / "one.csv"
    p.write_text("text,label\na,pos\nb,pos\n")
    with pytest.raises(AssetError, match="fewer than two distinct labels"):
        resolve_dataset("file", str(p))


# ---------------------------------------------------------------- packaged datasets
def test_trec_six_coarse_classes_deduplicated():
    ds = resolve_dataset("trec")
    assert ds.label_names == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert len(ds.texts) == len(set(ds.texts)) == 5381 and ds.pairs is None   # 15,452 lines, 5,381 questions
    assert set(ds.labels) == set(range(6))
    i = ds.texts.index("What is the full form of .com ?")
    assert ds.label_names[ds.labels[i]] == "ABBR"


def _fake_bigbench(path, examples):
    """A stand-in bigbench-1.0.0.tar.gz: the vitaminc task.json behind another member (as in the sdist)."""
    task = {"name": "vitaminc_fact_verification", "examples": examples}
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (("bigbench-1.0.0/README.md", b"x"), (VITAMINC_MEMBER, json.dumps(task).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_vitaminc_from_the_sdist_once(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLEGEND_CACHE", str(tmp_path / "cache"))
    with pytest.raises(AssetError) as err:
        resolve_dataset("vitaminc")
    assert "pip download --no-deps --no-binary :all:" in str(err.value) and "bigbench==1.0.0" in str(err.value)
    assert str(tmp_path / "cache" / "downloads") in str(err.value)

    scores = {"True": {"True": 1, "False": 0, "Neither": 0}, "False": {"True": 0, "False": 1, "Neither": 0},
              "Neither": {"True": 0, "False": 0, "Neither": 1}}
    examples = [{"input": f"Page {i}: a quote {i} .\nClaim: claim {i} .", "target_scores": scores[lab]}
                for i, lab in enumerate(["True", "False", "Neither", "True"])]
    sdist = tmp_path / "cache" / "downloads" / "bigbench-1.0.0.tar.gz"
    sdist.parent.mkdir(parents=True)
    _fake_bigbench(sdist, examples)
    ds = resolve_dataset("vitaminc")
    assert ds.label_names == ["True", "False", "Neither"] and ds.labels == [0, 1, 2, 0]
    assert ds.texts[1] == "Page 1: a quote 1 ." and ds.pairs[1] == "claim 1 ."
    sdist.unlink()                                  # extracted once: the archive is no longer needed
    assert resolve_dataset("vitaminc").pairs == ds.pairs


def test_vitaminc_from_a_task_json_path(tmp_path):
    p = tmp_path / "task.json"
    p.write_text(json.dumps({"examples": [{"input": "T: q\nClaim: c", "target_scores": {"True": 0, "False": 1}}]}))
    ds = resolve_dataset("vitaminc", str(p))
    assert ds.texts == ["T: q"] and ds.pairs == ["c"] and ds.labels == [1]
    p.write_text("{}")
    with pytest.raises(AssetError, match="not BIG-bench's vitaminc task.json"):
        resolve_dataset("vitaminc", str(p))


def test_split_of_a_pair_file_keeps_the_pairs(tmp_path, tiny_cfg):
    """The config's data.text_pair_column reaches the split: train and test ids are pair encodings."""
    from fedlegend.experiment import load_model_source, load_split

    p = tmp_path / "pairs.jsonl"
    p.write_text("".join(json.dumps({"evidence": f"quote number {i}", "claim": f"claim {i}", "label": i % 3}) + "\n"
                         for i in range(40)))
    cfg = tiny_cfg(**{"data.name": "file", "data.path": str(p), "data.text_column": "evidence",
                      "data.text_pair_column": "claim", "data.test_size": 10, "data.eval_subset": None})
    source = load_model_source(cfg)
    split = load_split(cfg, source)
    assert split.label_names == ["0", "1", "2"] and len(split.train) == 30 and len(split.test) == 10
    for enc in (split.train, split.test):
        assert enc.type_ids is not None and all(ids.count(source.tokenizer.sep_token_id) == 2 for ids in enc.ids)


@pytest.mark.slow
def test_real_vitaminc_when_downloaded(minilm_tokenizer):
    """The real BIG-bench task (skipped unless its sdist was downloaded or task.json extracted once)."""
    from fedlegend.assets import cache_dir

    if not (cache_dir() / "vitaminc" / "task.json").is_file() and \
            not (cache_dir() / "downloads" / "bigbench-1.0.0.tar.gz").is_file():
        pytest.skip("BIG-bench sdist not downloaded (an optional extra; see docs/running.md)")
    ds = resolve_dataset("vitaminc")
    assert len(ds.texts) == len(ds.pairs) == 54668 and ds.label_names == ["True", "False", "Neither"]
    assert np.bincount(ds.labels).tolist() == [27242, 20169, 7257]
    enc = Classification().encode(minilm_tokenizer, ds, range(32), max_length=128)
    assert all(ids.count(minilm_tokenizer.sep_token_id) == 2 and 1 in t for ids, t in zip(enc.ids, enc.type_ids))


def test_a_device_reads_the_pairs_of_its_own_file(tmp_path, tiny_cfg):
    """Deployment: a SuperNode's own pair file keeps its second text (data.text_pair_column), and a file
    without that column stops with the file and the key to set."""
    from fedlegend.device_data import DataSource, DeviceDataError, load_device_data
    from fedlegend.experiment import load_model_source

    p = tmp_path / "mine.jsonl"
    p.write_text("".join(json.dumps({"evidence": f"quote number {i}", "claim": f"claim {i}", "label": i % 3}) + "\n"
                         for i in range(12)))
    cfg = tiny_cfg(**{"data.name": "file", "data.text_column": "evidence", "data.text_pair_column": "claim"})
    source = load_model_source(cfg)
    data, labels = load_device_data(DataSource(path=str(p)), cfg, source, ["0", "1", "2"])
    assert labels == ["0", "1", "2"] and len(data) == 12 and data.labels.tolist() == [i % 3 for i in range(12)]
    assert data.type_ids is not None and all(ids.count(source.tokenizer.sep_token_id) == 2 for ids in data.ids)
    single = tmp_path / "single.jsonl"
    single.write_text(json.dumps({"evidence": "a quote", "label": 0}) + "\n")
    with pytest.raises(DeviceDataError, match=r"single\.jsonl.*claim.*text_pair_column"):
        load_device_data(DataSource(path=str(single)), cfg, source, ["0", "1", "2"])
