import pytest

from kvconnect.aggregator import FinishedAggregator
from kvconnect.api import TransferResults

pytestmark = pytest.mark.unit


def R(**kw) -> TransferResults:
    return TransferResults(**{k: set(v) if k != "stats" else v for k, v in kw.items()})


def test_request_is_emitted_only_once_every_worker_reported_it():
    agg = FinishedAggregator(3)
    out = agg.aggregate([R(finished_recving={"a"}), R(finished_recving={"a"}), R()])
    assert out.finished_recving == set()
    out = agg.aggregate([R(), R(), R(finished_recving={"a"})])
    assert out.finished_recving == {"a"}
    assert agg.pending() == 0  # deleted once emitted: no leak


def test_sends_and_receives_are_counted_apart():
    agg = FinishedAggregator(2)
    out = agg.aggregate([R(finished_sending={"x"}), R(finished_recving={"x"})])
    assert out.finished_sending == set() and out.finished_recving == set()
    out = agg.aggregate([R(finished_recving={"x"}), R(finished_sending={"x"})])
    assert out.finished_sending == {"x"} and out.finished_recving == {"x"}


def test_a_failure_from_any_worker_wins_over_success():
    agg = FinishedAggregator(2)
    out = agg.aggregate([R(finished_recving={"r"}, failed_recving={"r"}), R()])
    assert out.failed_recving == set()  # waits for the other worker
    out = agg.aggregate([R(), R(finished_recving={"r"})])
    assert out.finished_recving == {"r"} and out.failed_recving == {"r"}
    # the failure does not linger for a later request of the same id
    out = agg.aggregate([R(finished_recving={"r"}), R(finished_recving={"r"})])
    assert out.failed_recving == set()


def test_failed_without_finished_counts_as_received():
    agg = FinishedAggregator(1)
    out = agg.aggregate([R(failed_recving={"q"})])
    assert out.finished_recving == {"q"} and out.failed_recving == {"q"}


def test_empty_input_is_fine_and_invalid_blocks_union():
    agg = FinishedAggregator(2)
    assert agg.aggregate([]).is_empty()
    assert agg.aggregate([None, None]).is_empty()
    out = agg.aggregate([R(invalid_block_ids={1, 2}), R(invalid_block_ids={2, 3})])
    assert out.invalid_block_ids == {1, 2, 3}


def test_stats_are_summed_across_workers():
    agg = FinishedAggregator(2)
    out = agg.aggregate([R(stats={"bytes": 10, "sub": {"n": 1}}), R(stats={"bytes": 5, "sub": {"n": 2}})])
    assert out.stats == {"bytes": 15, "sub": {"n": 3}}


def test_reset_clears_partial_reports():
    agg = FinishedAggregator(2)
    agg.aggregate([R(finished_sending={"s"}), R()])
    assert agg.pending() == 1
    agg.reset()
    assert agg.pending() == 0
    assert agg.aggregate([R(finished_sending={"s"}), R()]).finished_sending == set()


@pytest.mark.parametrize("bad", [0, -1])
def test_world_size_must_be_positive(bad):
    with pytest.raises(ValueError, match="world_size"):
        FinishedAggregator(bad)
