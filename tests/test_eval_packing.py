"""Batch layout: shared/own split, row packing, branch masks and position ids (pure, no model)."""

from __future__ import annotations

import pytest
import torch

from peqa_cli.errors import InputError
from peqa_cli.eval.packing import Row, layout, make_batches, make_rows, score, split_request


def test_split_request_matches_lm_eval_input():
    r = split_request(0, [1, 2, 3], [4, 5], max_length=100)
    # lm-eval feeds (ctx + cont)[:-1] = 1 2 3 4 and scores its last 2 logits.
    assert (r.shared, r.own, r.targets) == ((1, 2, 3), (4,), (4, 5))
    t = split_request(0, list(range(10, 20)), [4, 5], max_length=5)
    assert t.shared + t.own == tuple(([*range(10, 20), 4, 5])[-6:][:-1])
    assert (t.shared, t.own) == ((16, 17, 18, 19), (4,))
    with pytest.raises(InputError, match="no tokens"):
        split_request(0, [1], [], max_length=5)
    with pytest.raises(InputError, match="exceeds the model's max length 2"):
        split_request(0, [1], [4, 5, 6], max_length=2)


def test_rows_group_by_context_and_respect_max_length():
    reqs = [
        split_request(0, [1, 2], [7, 8, 9], 100),
        split_request(1, [1, 2], [6], 100),
        split_request(2, [3], [7, 8], 100),
        split_request(3, [1, 2], [5, 5, 5], 100),
    ]
    rows = make_rows(reqs, pack=True, max_length=100)
    assert [[m.index for m in r.members] for r in rows] == [[0, 1, 3], [2]]
    assert rows[0].length == 2 + 2 + 0 + 2
    capped = make_rows(reqs, pack=True, max_length=4)
    assert [[m.index for m in r.members] for r in capped] == [[0, 1], [2], [3]]
    assert all(len(r.members) == 1 for r in make_rows(reqs, pack=False, max_length=100))
    batches = make_batches(rows + [Row((9,), [split_request(9, [9], [9], 100)])], batch_size=1)
    assert [len(b[0].members) for b in batches] == [3, 1, 1]  # packed rows first


def test_layout_branch_mask_and_positions():
    row = Row(
        (1, 2), [split_request(0, [1, 2], [7, 8, 9], 10), split_request(1, [1, 2], [6, 4], 10)]
    )
    lay = layout([row], pad_id=0, mask_dtype=torch.float32)
    # shared 1 2 | branch 0: 7 8 | branch 1: 6
    assert lay.input_ids.tolist() == [[1, 2, 7, 8, 6]]
    assert lay.position_ids.tolist() == [[0, 1, 2, 3, 2]]
    allowed = (lay.attention_mask[0, 0] == 0).int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 0, 0, 1],  # branch 1 skips branch 0
    ]
    assert lay.positions == [1, 2, 3, 1, 4] and lay.targets == [7, 8, 9, 6, 4]
    plain = layout(
        [Row((1, 2), [row.members[0]]), Row((5,), [split_request(2, [5], [3], 10)])], 0, None
    )
    assert plain.attention_mask.tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]
    assert plain.position_ids is None and plain.first_scored == 0


def test_common_leading_tokens_of_the_choices_run_once():
    a = split_request(0, [1, 2], [7, 8, 9, 5], 10)  # own 7 8 9
    b = split_request(1, [1, 2], [7, 8, 4], 10)  # own 7 8
    row = Row((1, 2), [a, b])
    assert row.common == 2 and row.length == 2 + 2 + 1 + 0
    lay = layout([row], pad_id=0, mask_dtype=torch.float32)
    # shared 1 2 + common 7 8 | branch 0: 9 | branch 1: (nothing left)
    assert lay.input_ids.tolist() == [[1, 2, 7, 8, 9]]
    assert lay.position_ids.tolist() == [[0, 1, 2, 3, 4]]
    # a predicts 7 8 9 5 from positions 1 2 3 4; b predicts 7 8 4 from 1 2 3
    assert lay.positions == [1, 2, 3, 4, 1, 2, 3] and lay.targets == [7, 8, 9, 5, 7, 8, 4]
    assert [n for _, n in lay.spans] == [4, 3]
    assert Row((1, 2), [a]).common == 0  # a lone request keeps its tokens in its branch


def test_score_gathers_and_sums():
    row = Row((1,), [split_request(0, [1], [2, 3], 10)])
    lay = layout([row], pad_id=0, mask_dtype=None)
    logits = torch.zeros(1, 2, 4)
    logits[0, 0, 2] = 5.0  # predicts token 2 greedily
    logits[0, 1, 0] = 5.0  # predicts token 0, not 3
    [(req, ll, greedy)] = score(logits, lay, offset=0)
    expected = torch.log_softmax(logits[0], -1)[[0, 1], [2, 3]].sum()
    assert req.index == 0 and ll == pytest.approx(float(expected)) and not greedy
