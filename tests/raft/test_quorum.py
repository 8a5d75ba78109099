"""Quorum maths cross-checked against naive twins on random inputs."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from chubbyfs.raft.progress import Inflights
from chubbyfs.raft.quorum import VoteResult, committed_index, has_quorum, quorum_value, vote_result

voter_sets = st.lists(st.integers(1, 9), min_size=0, max_size=7, unique=True)


def naive_committed(voters: list[int], match: dict[int, int]) -> int:
    """Largest index that a strict majority of voters has reached."""
    if not voters:
        return 0
    best = 0
    for candidate in {0, *match.values()}:
        if sum(1 for v in voters if match.get(v, 0) >= candidate) * 2 > len(voters):
            best = max(best, candidate)
    return best


@given(voter_sets, st.dictionaries(st.integers(1, 9), st.integers(0, 50)))
def test_committed_index_matches_naive(voters: list[int], match: dict[int, int]) -> None:
    assert committed_index(voters, match) == naive_committed(voters, match)


@given(voter_sets, st.dictionaries(st.integers(1, 9), st.booleans()))
def test_vote_result_matches_naive(voters: list[int], votes: dict[int, bool]) -> None:
    n = len(voters)
    yes = sum(1 for v in voters if votes.get(v) is True)
    missing = sum(1 for v in voters if v not in votes)
    if n == 0:
        expected = VoteResult.LOST
    elif 2 * yes > n:
        expected = VoteResult.WON
    elif 2 * (yes + missing) > n:
        expected = VoteResult.PENDING
    else:
        expected = VoteResult.LOST
    assert vote_result(voters, votes) == expected


@given(voter_sets, st.dictionaries(st.integers(1, 9), st.integers(-5, 50)))
def test_quorum_value_is_majority_lower_bound(voters: list[int], values: dict[int, int]) -> None:
    q = quorum_value(voters, values, missing=-1)
    if voters:
        at_least = sum(1 for v in voters if values.get(v, -1) >= q)
        above = sum(1 for v in voters if values.get(v, -1) > q)
        assert at_least * 2 > len(voters) and above * 2 <= len(voters)


@given(voter_sets, st.sets(st.integers(1, 9)))
def test_has_quorum_matches_naive(voters: list[int], members: set[int]) -> None:
    expected = bool(voters) and 2 * len(set(voters) & members) > len(voters)
    assert has_quorum(voters, members) == expected


@given(st.integers(1, 8), st.lists(st.tuples(st.booleans(), st.integers(0, 5)), max_size=60))
def test_inflights_against_list_model(capacity: int, ops: list[tuple[bool, int]]) -> None:
    infl = Inflights(capacity)
    model: list[int] = []
    last = 0
    for is_add, step in ops:
        if is_add:
            if len(model) >= capacity:
                assert infl.full()
                continue
            last += step
            infl.add(last)
            model.append(last)
        else:
            bound = model[0] + step if model else step
            infl.free_le(bound)
            model = [x for x in model if x > bound]
        assert infl.count() == len(model)
        assert infl.full() == (len(model) >= capacity)
