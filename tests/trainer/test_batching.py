import numpy as np
import pytest
import torch

from packer.records import Pack
from packer.trainer.batching import IGNORE_INDEX, PackOrder, collate, segment_boundaries, varlen_meta


def pack(ids, mask, doc_lens) -> Pack:
    return Pack(np.array(ids, np.int64), np.array(mask, np.uint8), np.array(doc_lens, np.int32))


# ---------------------------------------------------------------- segment_boundaries, by hand


def test_full_row_with_empty_document():
    actual, cu, max_seqlen = segment_boundaries([[2, 2, 0, 2, 2]], row_len=8)
    assert actual == [2, 4, 4, 6, 8]
    assert cu.tolist() == [0, 2, 4, 4, 6, 8] and cu.dtype == np.int32
    assert max_seqlen == 2


def test_two_rows_padding_tail_is_one_segment():
    actual, cu, max_seqlen = segment_boundaries([[3, 5], [2, 2]], row_len=8)
    assert actual == [3, 8, 10, 12, 16]
    assert cu.tolist() == [0, 3, 8, 10, 12, 16]
    assert max_seqlen == 5


def test_full_rows_without_padding():
    actual, cu, _ = segment_boundaries([[4, 4], [8], [1, 7]], row_len=8)
    assert actual == [4, 8, 16, 17, 24]
    assert cu.tolist() == [0, 4, 8, 16, 17, 24]


def test_empty_row_is_one_padding_segment():
    actual, cu, max_seqlen = segment_boundaries([[3], []], row_len=8)
    assert actual == [3, 8, 16]
    assert max_seqlen == 8


def test_overfull_row_names_the_fix():
    with pytest.raises(ValueError, match="--seq-length"):
        segment_boundaries([[5, 5]], row_len=8)


def test_meta_matches_attention_helper():
    meta = varlen_meta([[3, 5], [2, 2]], row_len=8)
    assert meta.cu_seqlens.tolist() == [0, 3, 8, 10, 12, 16] and meta.cu_seqlens.dtype == torch.int32
    assert meta.actual_seq_len == [3, 8, 10, 12, 16] and (meta.num_rows, meta.row_len) == (2, 8)


# ---------------------------------------------------------------- collate, by hand and as invariants


def test_collate_draws_like_the_docstring():
    PAD = 99
    p0 = pack([10, 11, 12, 20, 21, 22, 23, 24], [0, 1, 1, 0, 0, 1, 1, 1], [3, 5])
    p1 = pack([30, 31, 40, 41], [1, 1, 0, 1], [2, 2])
    mb = collate([p0, p1], row_len=8, pad_id=PAD)
    X = IGNORE_INDEX
    assert mb.tokens_T.tolist() == [10, 11, 12, 20, 21, 22, 23, 24, 30, 31, 40, 41, PAD, PAD, PAD, PAD]
    assert mb.positions_T.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 0, 1, 0, 1, 2, 3]
    # label[i] = token[i+1] only inside a document and only where token[i+1] is a target
    assert mb.labels_T.tolist() == [11, 12, X, X, 22, 23, 24, X, 31, X, 41, X, X, X, X, X]
    assert mb.meta.actual_seq_len == [3, 8, 10, 12, 16]
    assert (mb.num_tokens, mb.num_targets, mb.num_docs) == (12, 7, 4)


def test_padded_layout_is_one_document_per_row():
    p0 = pack([10, 11, 12, 20, 21], [1, 1, 1, 1, 1], [3, 2])
    p1 = pack([30, 31, 32, 33], [1, 1, 1, 1], [4])
    mb = collate([p0, p1], row_len=4, pad_id=0, layout="padded")
    assert mb.meta.num_rows == 3 and mb.meta.actual_seq_len == [3, 4, 6, 8, 12]
    assert mb.tokens_T.tolist() == [10, 11, 12, 0, 20, 21, 0, 0, 30, 31, 32, 33]
    packed = collate([p0, p1], row_len=8, pad_id=0)
    assert mb.num_tokens == packed.num_tokens and mb.num_targets == packed.num_targets


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_invariants_on_random_packs(fake_dataset, layout):
    S = fake_dataset.seq_length
    packs = [fake_dataset[i] for i in range(len(fake_dataset))]
    mb = collate(packs, row_len=S, pad_id=fake_dataset.pad_id, layout=layout)
    tokens, pos, labels = mb.tokens_T.numpy(), mb.positions_T.numpy(), mb.labels_T.numpy()
    starts = mb.meta.cu_seqlens[:-1].numpy()
    ends = mb.meta.cu_seqlens[1:].numpy()
    n_targets = 0
    for a, b in zip(starts, ends, strict=True):
        assert pos[a:b].tolist() == list(range(b - a)), "positions reset at every boundary"
        if b > a:
            assert labels[b - 1] == IGNORE_INDEX, "no label crosses a document boundary"
            inside = labels[a : b - 1]
            ok = inside != IGNORE_INDEX
            assert (inside[ok] == tokens[a + 1 : b][ok]).all(), "labels are the next token of the same doc"
            n_targets += ok.sum()
    assert n_targets == mb.num_targets
    assert mb.num_tokens == sum(len(p.ids) for p in packs)
    assert (tokens != fake_dataset.pad_id).sum() <= mb.num_tokens  # EOD == pad here, so <=
    assert mb.meta.actual_seq_len[-1] == mb.tokens_T.numel()


# ---------------------------------------------------------------- which rank reads which packs


def test_ranks_read_disjoint_shares_and_resume_in_place():
    n, B, W = 23, 2, 3
    orders = [PackOrder(n, B, seed=7, rank=r, world_size=W) for r in range(W)]
    epoch0 = [sum((o.next() for _ in range(o.per_epoch // B)), []) for o in orders]
    seen = sum(epoch0, [])
    assert len(seen) == len(set(seen)) == W * (n // W // B * B)

    fresh = PackOrder(n, B, seed=7)
    fresh.next(), fresh.next()
    state = fresh.state_dict()
    expected = [fresh.next() for _ in range(20)]  # crosses into later epochs
    resumed = PackOrder(n, B, seed=7)
    resumed.load_state_dict(state)
    assert [resumed.next() for _ in range(20)] == expected
    assert PackOrder(n, B, seed=8)._epoch_order(0).tolist() != fresh._epoch_order(0).tolist()


def test_too_few_packs_names_the_fix():
    with pytest.raises(ValueError, match="--micro-batch-size"):
        PackOrder(3, micro_batch_size=2, seed=0, world_size=2)
