import numpy as np
import pytest

from fedlegend.assets import AssetError, package_file, resolve_model
from fedlegend.datasets import TextDataset, resolve_dataset
from fedlegend.data import DataError, label_histogram, partition, sample_batches, split_train_test


def test_rotten_tomatoes_deduplicated():
    ds = resolve_dataset("rotten-tomatoes")
    assert len(ds.texts) == len(set(ds.texts)) > 12000
    assert ds.label_names == ["rotten", "fresh"] and set(ds.labels) == {0, 1}


def test_split_fixed_and_disjoint():
    ds = TextDataset([f"t{i}" for i in range(100)], [i % 2 for i in range(100)], ["a", "b"])
    tr, te = split_train_test(ds, 20)
    assert (tr, te) == split_train_test(ds, 20)
    assert len(te) == 20 and not set(tr) & set(te)
    with pytest.raises(DataError, match="test_size"):
        split_train_test(ds, 100)


def test_dirichlet_partition_seeded_and_skewed():
    labels = np.array([0] * 500 + [1] * 500)
    a = partition(labels, 10, "dirichlet", alpha=0.3, seed=1)
    b = partition(labels, 10, "dirichlet", alpha=0.3, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert sorted(np.concatenate(a).tolist()) == list(range(1000))
    fractions = [label_histogram(labels[p], 2)[0] / len(p) for p in a]
    assert max(fractions) - min(fractions) > 0.3          # alpha 0.3 is strongly non-IID
    iid = partition(labels, 10, "iid", alpha=1.0, seed=1)
    assert max(len(p) for p in iid) - min(len(p) for p in iid) <= 1


def test_empty_partition_is_an_error():
    with pytest.raises(DataError, match="empty"):
        partition(np.array([0, 1, 0]), 5, "iid", alpha=1.0, seed=0)


def test_sample_batches_cycles_small_partitions():
    b = sample_batches(5, steps=3, batch_size=4, rng=np.random.default_rng(0))
    assert [len(x) for x in b] == [4, 4, 4] and max(np.concatenate(b)) < 5


def test_missing_assets_name_the_fix(tmp_path):
    with pytest.raises(AssetError, match="pip install"):
        package_file("surely-not-installed-pkg", "x", "pip install surely-not-installed-pkg")
    with pytest.raises(AssetError, match="unknown model"):
        resolve_model("gpt-17")
    with pytest.raises(AssetError, match="config.json"):
        resolve_model("local", str(tmp_path))
    with pytest.raises(AssetError, match="not found"):
        resolve_dataset("file", str(tmp_path / "x.csv"))


def test_bring_your_own_csv_and_jsonl(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("review,stars\ngood,pos\nbad,neg\nfine,pos\n")
    ds = resolve_dataset("file", str(csv), text_column="review", label_column="stars")
    assert ds.label_names == ["neg", "pos"] and ds.labels == [1, 0, 1]
    js = tmp_path / "d.jsonl"
    js.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n')
    assert resolve_dataset("file", str(js)).texts == ["a", "b"]
    with pytest.raises(AssetError, match="lacks column"):
        resolve_dataset("file", str(csv))
