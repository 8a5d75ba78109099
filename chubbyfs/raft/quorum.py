"""Pure majority arithmetic: commit index, vote tally, lease bound.

Kept free of Raft state so it can be cross-checked against a naive twin on
random inputs (tests/raft/test_quorum.py).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping


class VoteResult(enum.IntEnum):
    PENDING = 0
    LOST = 1
    WON = 2


def majority_size(voter_count: int) -> int:
    return voter_count // 2 + 1


def quorum_value(voters: Iterable[int], values: Mapping[int, int], missing: int = 0) -> int:
    """The largest v such that a majority of voters have values[id] >= v.

    A voter absent from `values` counts as `missing`. With no voters the
    answer is `missing` (an empty configuration can agree on nothing).
    Used for the commit index (values = match indexes) and the leader lease
    (values = echoed send ticks).
    """
    seen = sorted((values.get(v, missing) for v in voters), reverse=True)
    if not seen:
        return missing
    return seen[majority_size(len(seen)) - 1]


def committed_index(voters: Iterable[int], match: Mapping[int, int]) -> int:
    return quorum_value(voters, match, 0)


def vote_result(voters: Iterable[int], votes: Mapping[int, bool]) -> VoteResult:
    """WON once a majority granted, LOST once a majority can no longer grant."""
    voter_list = list(voters)
    if not voter_list:
        # Nobody can be elected by an empty configuration.
        return VoteResult.LOST
    granted = rejected = 0
    for v in voter_list:
        answer = votes.get(v)
        if answer is True:
            granted += 1
        elif answer is False:
            rejected += 1
    need = majority_size(len(voter_list))
    if granted >= need:
        return VoteResult.WON
    if len(voter_list) - rejected < need:
        return VoteResult.LOST
    return VoteResult.PENDING


def has_quorum(voters: Iterable[int], members: Iterable[int]) -> bool:
    """True if `members` contains a majority of `voters`."""
    voter_set = set(voters)
    if not voter_set:
        return False
    return len(voter_set.intersection(members)) >= majority_size(len(voter_set))
