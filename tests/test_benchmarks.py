"""The loss benchmark's memory measurement, as a property of the loss."""

from supcon_tf import benchmarks


def test_loss_memory_stays_rows_by_rows():
    # A [rows, rows, dim] tensor at dim 128 would alone be 128 buffers of
    # [rows, rows] float32; the loss must stay within a few.
    measured = benchmarks.loss_peak_memory(1024, 128)
    assert measured["rows"] == 1024
    assert 0.5 < measured["rows_by_rows_float32_buffers"] < 16


def test_time_loss_reports_repeats():
    timing = benchmarks.time_loss(64, 16, repeats=2)
    assert timing["repeats"] == 2
    assert timing["min_seconds"] <= timing["median_seconds"]
    assert timing["median_seconds"] <= timing["max_seconds"]
    assert timing["loss"] > 0.0
