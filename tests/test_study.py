"""experiments/study.py: the headline arithmetic (the paper's speed-up) on hand-made FID curves, and the
report of a study with nothing finished."""
import pytest

from experiments import study

BASE = [(100, 90.0), (200, 70.0), (300, 60.0), (400, 50.0)]   # final FID 50 at step 400


def test_interpolated_speedup():
    # reaches 50 between 100 (60) and 200 (40): at 150 -> 400 / 150
    method = [(100, 60.0), (200, 40.0), (300, 35.0), (400, 30.0)]
    r = study.speedup(BASE, method)
    assert r["bound"] == "=" and r["steps"] == pytest.approx(150) and r["factor"] == pytest.approx(400 / 150)


def test_first_crossing_counts_not_a_later_one():
    method = [(100, 95.0), (200, 48.0), (300, 55.0), (400, 45.0)]   # dips below 50 at 200, back up, below again
    r = study.speedup(BASE, method)
    assert r["steps"] == pytest.approx(100 + 100 * (95 - 50) / (95 - 48))


def test_identical_curves_give_one():
    assert study.speedup(BASE, BASE)["factor"] == pytest.approx(1.0)


def test_lower_bound_when_already_below_at_first_checkpoint():
    r = study.speedup(BASE, [(100, 45.0), (200, 40.0), (300, 30.0), (400, 20.0)])
    assert r["bound"] == ">=" and r["factor"] == pytest.approx(4.0)


def test_slower_method_gives_factor_below_one():
    # never reaches 50; its final FID 70 is reached by the baseline at step 200 -> 200 / 400
    r = study.speedup(BASE, [(100, 95.0), (200, 85.0), (300, 75.0), (400, 70.0)])
    assert r["bound"] == "=" and r["steps"] is None and r["factor"] == pytest.approx(0.5)
    # the baseline below the method's final FID already at its first checkpoint: an upper bound
    r = study.speedup(BASE, [(100, 99.0), (200, 98.0), (300, 97.0), (400, 95.0)])
    assert r["bound"] == "<=" and r["factor"] == pytest.approx(100 / 400)


@pytest.mark.parametrize("scale", list(study.SCALES))
def test_report_only_with_nothing_finished_writes_an_empty_table(tmp_path, scale):
    """Every scale's settings pass the script's checks; with nothing finished the report is an empty table."""
    study.main(["--scale", scale, "--out", str(tmp_path), "--report-only"])
    table = (tmp_path / "table.md").read_text()
    assert "speed-up **n/a**" in table and f"{study.SCALES[scale]['steps']} steps" in table
    assert not list(tmp_path.glob("*.png"))
