"""Schedules as data: structure of every generator, DeepSeek's 8-step shape, and validate()."""

from __future__ import annotations

import dataclasses

import pytest

from dsjax.dualpipe import Op, dualpipe, dualpipev, gpipe, make_schedule, one_f_one_b, validate, zb1p
from dsjax.dualpipe.schedules import SCHEDULES

CASES = [("gpipe", 4, 6), ("1f1b", 4, 3), ("1f1b", 6, 12), ("zb1p", 4, 8), ("zb1p", 8, 5),
         ("dualpipe", 4, 8), ("dualpipe", 6, 14), ("dualpipe", 8, 20), ("dualpipev", 4, 8), ("dualpipev", 8, 17)]


@pytest.mark.parametrize("name,pp,n", CASES)
def test_generators_validate_and_cover_all_work(name, pp, n):
    s = make_schedule(name, pp, n)
    validate(s)
    assert s.pp == pp and s.num_microbatches == n and len(s.ranks) == pp
    kinds = [p.kind for ops in s.ranks for op in ops for p in op.parts()]
    assert kinds.count("F") == s.num_stages * n
    assert kinds.count("B") + kinds.count("BI") == s.num_stages * n
    assert kinds.count("W") == kinds.count("BI")
    if name in ("1f1b", "gpipe"):
        assert "BI" not in kinds and "FB" not in [op.kind for ops in s.ranks for op in ops]
    if name == "zb1p":
        assert "B" not in kinds


def test_dualpipe_placement_and_directions():
    pp, n = 8, 20
    s = dualpipe(pp, n)
    assert s.rank_stages == tuple((r, pp - 1 - r) for r in range(pp))
    place = s.placement()
    for m in range(n):
        for st in range(pp):
            # first half of the micro-batches enter at rank 0, the second half at rank pp-1
            assert place[(st, m)] == (st if m < n // 2 else pp - 1 - st)
    # every rank runs each of its two stages on n/2 micro-batches: the work is balanced
    for ops in s.ranks:
        assert sum(p.kind == "F" for op in ops for p in op.parts()) == n


def test_dualpipe_eight_steps_rank0():
    """Rank 0 of dualpipe(8, 20) against the 8 steps written out by hand (half_rank 0)."""
    pp, n = 8, 20
    ops = dualpipe(pp, n).ranks[0]
    head = [str(o) for o in ops[:12]]
    # step 1: 2*(pp/2-1)=6 forwards of stage 0; step 2: one F0 F1 pair (stage 7 runs mbs 10..)
    assert head[:8] == [f"F(s0m{m})" for m in range(7)] + ["F(s7m10)"]
    # step 3: pp/2-1 = 3 times (BI1, W1, F1) on the reverse-direction stage
    assert head[8:11] == ["BI(s7m10)", "W(s7m10)", "F(s7m11)"]
    kinds = [o.kind for o in ops]
    # step 4: half - pp + 1 = 3 iterations of two FB ops (rank 0 is not a middle rank)
    first_fb = kinds.index("FB")
    assert kinds[first_fb:first_fb + 6] == ["FB"] * 6
    # after 3 (BI, W, F) steps the next dir-1 backward is micro-batch 10 + 3
    assert ops[first_fb] == Op("FB", 0, 7, 7, 13)
    assert kinds[-1] == "W" and kinds.count("FB") == 2 * 3 + 3


def test_middle_rank_does_not_overlap_first_pair():
    s = dualpipe(4, 8)
    for r in (1, 2):
        ops = s.ranks[r]
        i = next(i for i, o in enumerate(ops) if o.kind in ("FB",) or (o.kind == "B"))
        assert ops[i - 1].kind == "F" and ops[i].kind == "B"  # F0 then B1 unpaired, then the FBs


def test_dualpipev_is_a_v():
    pp, n = 4, 9
    s = dualpipev(pp, n)
    assert s.num_stages == 2 * pp
    place = s.placement()
    for m in range(n):
        assert [place[(st, m)] for st in range(2 * pp)] == [0, 1, 2, 3, 3, 2, 1, 0]


@pytest.mark.parametrize("gen,args,match", [
    (dualpipe, (5, 20), "pp must be even"),
    (dualpipe, (4, 7), "even and >= 2\\*pp"),
    (dualpipe, (4, 6), "even and >= 2\\*pp"),
    (dualpipev, (4, 7), ">= 2\\*pp"),
    (one_f_one_b, (0, 4), "pp must be a positive int"),
    (gpipe, (4, 0), "num_microbatches must be a positive int"),
])
def test_generators_reject_bad_sizes(gen, args, match):
    with pytest.raises(ValueError, match=match):
        gen(*args)


def _with_rank_ops(s, r, ops):
    ranks = list(s.ranks)
    ranks[r] = tuple(ops)
    return dataclasses.replace(s, ranks=tuple(ranks))


def test_validate_rejects_missing_forward():
    s = one_f_one_b(4, 4)
    ops = [o for o in s.ranks[2] if o != Op("F", 2, 3)]
    with pytest.raises(ValueError, match=r"\(stage 2, micro-batch 3\) must have exactly one F, got 0"):
        validate(_with_rank_ops(s, 2, ops))


def test_validate_rejects_duplicate_backward():
    s = one_f_one_b(4, 4)
    with pytest.raises(ValueError, match="must have one B, or one BI and one W; got 2 B"):
        validate(_with_rank_ops(s, 1, list(s.ranks[1]) + [Op("B", 1, 0)]))


def test_validate_rejects_w_without_bi():
    s = zb1p(4, 4)
    ops = [Op("B", 0, 0) if o == Op("BI", 0, 0) else o for o in s.ranks[0]]
    with pytest.raises(ValueError, match="got 1 B, 0 BI, 1 W"):
        validate(_with_rank_ops(s, 0, ops))


def test_validate_rejects_deadlock():
    s = one_f_one_b(4, 4)
    ops = list(s.ranks[3])
    ops.insert(0, ops.pop(ops.index(Op("B", 3, 0))))  # backward before its forward
    with pytest.raises(ValueError, match="deadlocks: .*rank 3 waits at B\\(s3m0\\)"):
        validate(_with_rank_ops(s, 3, ops))


def test_validate_rejects_w_before_bi_and_wrong_rank_and_stage():
    s = zb1p(4, 4)
    ops = list(s.ranks[2])
    i, j = ops.index(Op("BI", 2, 1)), ops.index(Op("W", 2, 1))
    ops[i], ops[j] = ops[j], ops[i]
    with pytest.raises(ValueError, match="deadlocks"):
        validate(_with_rank_ops(s, 2, ops))
    with pytest.raises(ValueError, match="uses stage 3, but the rank holds stages \\(2,\\)"):
        validate(_with_rank_ops(s, 2, list(s.ranks[2]) + [Op("F", 3, 0)]))
    with pytest.raises(ValueError, match="micro-batch in \\[0, 4\\)"):
        validate(_with_rank_ops(s, 2, list(s.ranks[2]) + [Op("F", 2, 9)]))
    with pytest.raises(ValueError, match="op kind must be one of"):
        validate(_with_rank_ops(s, 2, list(s.ranks[2]) + [Op("X", 2, 0)]))


def test_validate_rejects_dependent_fb_halves():
    s = dualpipe(4, 8)
    ops = list(s.ranks[0]) + [Op("FB", 0, 1, 0, 1)]
    with pytest.raises(ValueError, match="halves of .* depend on each other"):
        validate(_with_rank_ops(s, 0, ops))


def test_forward_only_schedule():
    s = dualpipe(4, 8).forward_only()
    validate(s)
    assert not s.has_backward
    assert all(o.kind == "F" for ops in s.ranks for o in ops)


def test_make_schedule_names():
    assert set(SCHEDULES) == {"gpipe", "1f1b", "zb1p", "dualpipe", "dualpipev"}
    with pytest.raises(ValueError, match="name must be one of"):
        make_schedule("interleaved", 4, 8)


def test_validate_rejects_backward_on_another_rank_and_incomplete_fb():
    s = dualpipe(4, 8)
    # stage 3 is held by ranks 0 (slot 1) and 3 (slot 0); micro-batch 0 runs it on rank 3
    assert Op("W", 3, 0) in s.ranks[3]
    ops3 = [o for o in s.ranks[3] if o != Op("W", 3, 0)]
    moved = _with_rank_ops(_with_rank_ops(s, 3, ops3), 0, list(s.ranks[0]) + [Op("W", 3, 0)])
    with pytest.raises(ValueError, match=r"backward of \(stage 3, micro-batch 0\) must run on rank 3 \(its F\), "
                                         r"got ranks \[3, 0\]"):
        validate(moved)
    with pytest.raises(ValueError, match="FB op needs b_stage and b_mb"):
        validate(_with_rank_ops(s, 3, ops3 + [Op("FB", 3, 0)]))


def test_validate_rejects_wrong_rank_count():
    s = one_f_one_b(4, 4)
    with pytest.raises(ValueError, match="must have pp=4 entries, got 3 and 4"):
        validate(dataclasses.replace(s, ranks=s.ranks[:3]))
