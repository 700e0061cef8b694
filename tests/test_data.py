"""Specification of ea4llm_pool.data: corpus loading, disjoint splits, samples, subsets."""

import collections

import datasets.config
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from ea4llm_pool import UserError
from ea4llm_pool.config import load
from ea4llm_pool.data import (SampleSet, check_subset, digest_indices, load_texts, prepare_samples,
                              split_heldout, subset_indices)
from ea4llm_pool.tokenizer import EOS, train_bpe


def cfg_with(*overrides):
    return load(overrides=list(overrides))


@pytest.fixture(scope="module")
def pydoc_texts():
    return load_texts(cfg_with())


@pytest.fixture(scope="module")
def tok(pydoc_texts):
    return train_bpe(pydoc_texts, 1024)


@pytest.fixture(scope="module")
def default_samples(tok, pydoc_texts):
    return prepare_samples(cfg_with(), tok, pydoc_texts)


def numbered_corpus(path, n=200):
    path.write_text("".join(f"line {i:04d} says something\n\n" for i in range(n)), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- corpus


def test_pydoc_corpus_is_thousands_of_non_empty_lines_in_a_fixed_order(pydoc_texts):
    assert len(pydoc_texts) > 5000
    assert all(t.strip() and t == t.rstrip() for t in pydoc_texts)
    assert load_texts(cfg_with()) == pydoc_texts


def test_max_lines_keeps_the_first_lines(pydoc_texts):
    assert load_texts(cfg_with("data.max_lines=100")) == pydoc_texts[:100]


def test_a_file_a_directory_and_a_glob_give_their_lines_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("beta\n\n  indented\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("alpha\r\n", encoding="utf-8")
    (tmp_path / "skip.md").write_text("not text\n", encoding="utf-8")
    assert load_texts(cfg_with(f"data.source={tmp_path / 'b.txt'}")) == ["beta", "  indented"]
    assert load_texts(cfg_with(f"data.source={tmp_path}")) == ["alpha", "beta", "  indented"]
    assert load_texts(cfg_with(f"data.source={tmp_path}/*.txt")) == ["alpha", "beta", "  indented"]


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.txt", "data.source not found"),
    (lambda d: (d / "empty.txt").write_text("\n \n") and d / "empty.txt", "corpus is empty"),
    (lambda d: d, "directory holds no \\*.txt files"),
    (lambda d: d / "*.nothing", "glob matches no files"),
    (lambda d: (d / "bin.txt").write_bytes(b"\xff\xfe\x00") and d / "bin.txt", "not UTF-8"),
])
def test_bad_local_sources_are_one_line_user_errors(tmp_path, make, message):
    source = make(tmp_path)
    with pytest.raises(UserError, match=message) as err:
        load_texts(cfg_with(f"data.source={source}"))
    assert "\n" not in str(err.value)


def test_an_unknown_hub_dataset_offline_is_a_one_line_user_error(monkeypatch):
    # Offline mode makes datasets fail at once instead of retrying the network for ~25 s.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="cannot be loaded as a hub dataset") as err:
        load_texts(cfg_with("data.source=no-such-org/no-such-corpus"))
    assert "\n" not in str(err.value) and len(str(err.value)) < 400


# ----------------------------------------------------------------------------- split


def test_held_out_part_is_the_disjoint_tail_of_the_pydoc_corpus(pydoc_texts):
    train, held = split_heldout(pydoc_texts, 0.1)
    assert train + held == pydoc_texts
    assert train and held
    share = sum(len(t) + 1 for t in held) / sum(len(t) + 1 for t in pydoc_texts)
    assert 0.09 < share <= 0.101


def test_train_and_held_out_samples_never_share_a_line(tmp_path, tok):
    cfg = cfg_with(f"data.source={numbered_corpus(tmp_path / 'c.txt')}", "data.packing=false",
                   "data.heldout_fraction=0.25")
    train, held = prepare_samples(cfg, tok, load_texts(cfg))

    def numbers(s):
        ids, mask = s.batch(range(len(s)))
        return {int(tok.decode(i[m.bool()]).split()[1]) for i, m in zip(ids, mask)}

    assert numbers(train) == set(range(150)) and numbers(held) == set(range(150, 200))


# ----------------------------------------------------------------------------- samples


def test_default_config_packs_pydoc_into_full_64_token_windows(default_samples):
    train, held = default_samples
    assert len(train) > 2000 and len(held) > 200
    for s in default_samples:
        assert s.input_ids.shape == (len(s), 64) and s.input_ids.dtype == np.int64
        assert (s.mask == 1).all()


def test_packed_windows_are_the_corpus_stream_with_eos_after_every_line(tok, pydoc_texts, default_samples):
    train_texts, _ = split_heldout(pydoc_texts, 0.1)
    eos = tok.eos_token_id
    stream = [t for ids in tok(train_texts[:50])["input_ids"] for t in (*ids, eos)]
    n = len(stream) // 64
    assert default_samples[0].input_ids[:n].reshape(-1).tolist() == stream[: n * 64]


def test_unpacked_samples_are_lines_right_padded_with_a_prefix_mask(tok):
    texts = ["x", "a short line", "word " * 100, "the held-out line"]
    cfg = cfg_with("data.packing=false", "data.seq_len=16", "data.heldout_fraction=0.01")
    train, held = prepare_samples(cfg, tok, texts)
    short = tok("a short line")["input_ids"] + [tok.eos_token_id]
    assert len(train) == 3 and len(held) == 1  # "x" + eos is still 2 tokens: kept
    ids, mask = train.batch([1, 2])
    assert ids[0, : len(short)].tolist() == short
    assert mask[0].tolist() == [1] * len(short) + [0] * (16 - len(short))
    assert (ids[0, len(short):] == tok.pad_token_id).all()
    assert mask[1].sum() == 16  # the long line is truncated to seq_len


def test_without_eos_lines_of_fewer_than_two_tokens_are_dropped(tok):
    # With an eos every line has at least 2 tokens; without one, a 1-token line predicts nothing.
    no_eos = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, pad_token=EOS)
    assert no_eos.eos_token_id is None
    cfg = cfg_with("data.packing=false", "data.seq_len=8", "data.heldout_fraction=0.3")
    train, held = prepare_samples(cfg, no_eos, ["x", "a short line", "y", "held out line"])
    assert len(train) == 1 and len(held) == 1
    assert train.mask.sum() == len(no_eos("a short line")["input_ids"])


def test_a_corpus_too_small_for_seq_len_is_a_user_error(tok):
    cfg = cfg_with("data.seq_len=4096")
    with pytest.raises(UserError, match="held-out part yields no 4096-token windows.*lower data.seq_len"):
        prepare_samples(cfg, tok, load_texts(cfg_with("data.max_lines=800")))
    with pytest.raises(UserError, match="at least 2 are needed"):
        prepare_samples(cfg_with(), tok, ["only one line"])


def test_sample_preparation_is_deterministic(tok, pydoc_texts, default_samples):
    again = prepare_samples(cfg_with(), tok, list(pydoc_texts))
    assert [s.digest() for s in again] == [s.digest() for s in default_samples]


def test_digest_is_a_known_answer_of_shape_ids_and_mask():
    s = SampleSet(np.arange(6).reshape(2, 3), np.array([[1, 1, 1], [1, 1, 0]]))
    assert s.digest() == "881fcf6e27b9608b0f00afdc8eb448f0458c1bcd2ccd75332e2f988c8696bb2b"
    assert SampleSet(np.arange(6).reshape(3, 2), np.ones((3, 2))).digest() != \
        SampleSet(np.arange(6).reshape(2, 3), np.ones((2, 3))).digest()


def test_samples_are_immutable_and_batches_are_fresh_tensors_in_the_order_asked():
    s = SampleSet(np.arange(12).reshape(4, 3), np.ones((4, 3)))
    with pytest.raises(ValueError):
        s.input_ids[0, 0] = 7
    ids, mask = s.batch([3, 0])
    assert ids.dtype == mask.dtype == torch.int64
    assert ids.tolist() == [[9, 10, 11], [0, 1, 2]]
    ids[0, 0] = -1
    assert s.input_ids[3, 0] == 9


def test_save_and_load_round_trip_and_detect_corruption(tmp_path, default_samples):
    train = default_samples[0]
    path = tmp_path / "train.npz"
    train.save(path)
    assert SampleSet.load(path).digest() == train.digest()

    tampered = train.input_ids.copy()
    tampered[0, 0] += 1
    np.savez(path, input_ids=tampered, mask=train.mask, digest=np.array(train.digest()))
    with pytest.raises(UserError, match="digest mismatch"):
        SampleSet.load(path)

    path.write_bytes(b"not a zip file")
    with pytest.raises(UserError, match="unreadable or corrupt"):
        SampleSet.load(path)
    with pytest.raises(UserError, match="not found"):
        SampleSet.load(tmp_path / "missing.npz")


# ----------------------------------------------------------------------------- subsets


def test_subset_indices_are_a_known_answer_on_every_platform():
    # PCG64 + SeedSequence are fully specified, and the sampling is exact integer arithmetic.
    assert subset_indices(2267, 8, seed=0, iteration=0) == [210, 376, 579, 681, 1416, 1610, 1860, 1931]


def test_subset_indices_are_sorted_distinct_in_range_and_deterministic():
    for it in range(50):
        idx = subset_indices(100, 30, seed=7, iteration=it)
        assert idx == sorted(set(idx)) and len(idx) == 30 and 0 <= idx[0] and idx[-1] < 100
        assert idx == subset_indices(100, 30, seed=7, iteration=it)
    assert subset_indices(5, 5, 0, 0) == [0, 1, 2, 3, 4]


def test_subsets_differ_across_iterations_and_seeds():
    by_iteration = {tuple(subset_indices(2267, 16, 0, it)) for it in range(200)}
    assert len(by_iteration) == 200
    assert subset_indices(2267, 16, 0, 3) != subset_indices(2267, 16, 1, 3)


def test_every_sample_is_equally_likely():
    counts = collections.Counter(i for it in range(4000) for i in subset_indices(10, 3, 0, it))
    assert sorted(counts) == list(range(10))
    assert all(abs(c - 1200) < 150 for c in counts.values())  # 1200 expected, sd ~29


def test_a_subset_larger_than_the_training_set_is_a_user_error():
    check_subset(cfg_with("es.samples_per_iteration=16"), 16)
    with pytest.raises(UserError, match="samples_per_iteration 17 exceeds the 16 training samples"):
        check_subset(cfg_with("es.samples_per_iteration=17"), 16)
    with pytest.raises(UserError):
        subset_indices(16, 17, 0, 0)


def test_digest_indices_is_short_and_order_sensitive():
    d = digest_indices([1, 2, 3])
    assert len(d) == 16 and int(d, 16) >= 0
    assert d == digest_indices(np.array([1, 2, 3])) != digest_indices([3, 2, 1])


# ----------------------------------------------------------------------------- padding trim


def test_a_batch_is_cut_after_its_longest_sample_and_keeps_the_rest_as_stored():
    ids = np.arange(40).reshape(4, 10)
    mask = np.zeros((4, 10), dtype=np.int64)
    for row, n in enumerate((3, 7, 2, 5)):
        mask[row, :n] = 1
    s = SampleSet(ids, mask)
    b_ids, b_mask = s.batch([2, 0, 3])
    assert b_ids.shape == b_mask.shape == (3, 5)
    assert b_ids.tolist() == ids[[2, 0, 3], :5].tolist() and b_mask.tolist() == mask[[2, 0, 3], :5].tolist()
    assert b_ids.is_contiguous() and b_mask.is_contiguous()
    assert s.batch([1, 2])[0].shape == (2, 7)


def test_packed_windows_are_never_trimmed(default_samples):
    ids, mask = default_samples[0].batch([0, 5, 9])
    assert ids.shape == mask.shape == (3, 64)


def test_trimming_the_padding_leaves_every_samples_fitness_unchanged(tok, pydoc_texts):
    from ea4llm_pool.es.fitness import fitness_sums, sample_rewards
    from ea4llm_pool.model import build_model

    cfg = cfg_with("data.packing=false", "data.seq_len=128", "data.max_lines=2000")
    train, _ = prepare_samples(cfg, tok, pydoc_texts[:2000])
    model = build_model(cfg, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    idx = subset_indices(len(train), 48, seed=3, iteration=0)
    ids, mask = train.batch(idx)
    full_ids = torch.from_numpy(train.input_ids[idx])
    full_mask = torch.from_numpy(train.mask[idx])
    assert ids.shape[1] < full_ids.shape[1] == 128  # pydoc lines are far shorter than 128 tokens
    assert ids.shape[1] == int(train.mask[idx].sum(axis=1).max())
    assert torch.allclose(sample_rewards(model, ids, mask), sample_rewards(model, full_ids, full_mask),
                          rtol=1e-6, atol=1e-6)
    trimmed_sum, trimmed_n = fitness_sums(model, ids, mask, micro_batch=16)
    full_sum, full_n = fitness_sums(model, full_ids, full_mask, micro_batch=16)
    assert trimmed_n == full_n == 48
    assert trimmed_sum == pytest.approx(full_sum, rel=1e-6, abs=1e-6)
