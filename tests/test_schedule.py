import itertools

import pytest

from lightx2v_sp.distributed.schedule import partners, round_robin_rounds


@pytest.mark.parametrize("n", range(2, 17))
def test_circle_method_properties(n):
    rounds = round_robin_rounds(n)
    assert len(rounds) == (n - 1 if n % 2 == 0 else n)
    met = []
    for pairs in rounds:
        ranks = [r for pair in pairs for r in pair]
        assert len(ranks) == len(set(ranks)), "a rank has two partners in one round"
        if n % 2 == 0:
            assert sorted(ranks) == list(range(n)), "even N: every round is a perfect matching"
        else:
            assert len(ranks) == n - 1, "odd N: exactly one rank idles per round"
        met.extend(pairs)
    assert sorted(met) == list(itertools.combinations(range(n), 2)), "each pair meets exactly once"


@pytest.mark.parametrize("n", range(1, 17))
def test_partner_lookup_is_symmetric(n):
    for rank in range(n):
        table = partners(n, rank)
        assert len(table) == len(round_robin_rounds(n))
        for r, p in enumerate(table):
            if p is not None:
                assert partners(n, p)[r] == rank
        assert sorted(p for p in table if p is not None) == [p for p in range(n) if p != rank]


def test_partner_table_is_cached():
    assert partners(8, 3) is partners(8, 3)


def test_bad_arguments():
    with pytest.raises(ValueError):
        partners(4, 4)
    with pytest.raises(ValueError):
        round_robin_rounds(0)
