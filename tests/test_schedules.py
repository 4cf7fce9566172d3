"""lr_at against the tml formulas, with expected values written out by hand."""

from __future__ import annotations

import math

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

import recap_embed.config  # noqa: F401  (registers the groups)
from recap_embed.config import LearningRate, LinearRampToConstant, LinearRampToCosine, PiecewiseConstant
from recap_embed.optim.schedules import lr_at, schedule_name

RAMP_CONST = LearningRate(linear_ramp_to_constant=LinearRampToConstant(learning_rate=0.1, num_ramp_steps=100))
RAMP_COS = LearningRate(
    linear_ramp_to_cosine=LinearRampToCosine(
        learning_rate=0.1, final_learning_rate=0.01, num_ramp_steps=100, final_num_steps=1100
    )
)
PIECEWISE = LearningRate(
    piecewise_constant=PiecewiseConstant(learning_rate_boundaries=[10, 20], learning_rate_values=[1.0, 0.5, 0.25])
)


def as_forms(schedule: LearningRate):
    """The same schedule as dataclass, typed DictConfig and plain dict."""
    return [schedule, OmegaConf.structured(schedule), OmegaConf.to_container(OmegaConf.structured(schedule))]


@pytest.mark.parametrize("form", range(3))
@pytest.mark.parametrize(
    "step,expected",
    [(0, 0.0), (50, 0.05), (99, 0.099), (100, 0.1), (101, 0.1), (250, 0.1)],
)
def test_linear_ramp_to_constant(form: int, step: int, expected: float) -> None:
    assert lr_at(as_forms(RAMP_CONST)[form], step, 7.0) == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("form", range(3))
@pytest.mark.parametrize(
    "step,expected",
    [
        (0, 0.0),  # ramp starts from zero
        (50, 0.05),  # mid-ramp
        (99, 0.099),  # last ramp step
        (100, 0.1),  # end of ramp: cos(0) = 1, the peak
        (350, 0.0868198051533946),  # quarter of the decay: 0.01 + 0.09 * 0.5 * (1 + cos(pi/4))
        (600, 0.055),  # mid-cosine: cos(pi/2) = 0
        (1100, 0.01),  # final step: cos(pi) = -1
        (1101, 0.01),  # after the final step
        (10**9, 0.01),
    ],
)
def test_linear_ramp_to_cosine(form: int, step: int, expected: float) -> None:
    assert lr_at(as_forms(RAMP_COS)[form], step, 7.0) == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("form", range(3))
@pytest.mark.parametrize(
    "step,expected",
    [(0, 1.0), (9, 1.0), (10, 0.5), (19, 0.5), (20, 0.25), (21, 0.25), (5000, 0.25)],
)
def test_piecewise_constant_at_boundaries(form: int, step: int, expected: float) -> None:
    # bisect_right: a step equal to a boundary already takes the next value.
    assert lr_at(as_forms(PIECEWISE)[form], step, 7.0) == expected


def test_constant_and_no_schedule() -> None:
    assert lr_at(LearningRate(constant=0.05), 0, 7.0) == 0.05
    assert lr_at({"constant": 3}, 123, 7.0) == 3.0
    assert lr_at(LearningRate(), 0, 0.02) == 0.02
    assert lr_at({}, 10**6, 0.02) == 0.02
    assert schedule_name(LearningRate()) is None
    assert schedule_name(RAMP_COS) == "linear_ramp_to_cosine"
    assert schedule_name(OmegaConf.structured(PIECEWISE)) == "piecewise_constant"


def test_rejects_negative_step_and_two_schedules() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        lr_at(RAMP_CONST, -1, 0.1)
    with pytest.raises(ValueError, match="2 schedules"):
        lr_at({"constant": 0.1, "linear_ramp_to_constant": {"learning_rate": 0.1, "num_ramp_steps": 10}}, 0, 0.1)
    with pytest.raises(ValueError, match="num_ramp_steps"):
        lr_at(LearningRate(linear_ramp_to_constant=LinearRampToConstant(learning_rate=0.1)), 5, 0.1)


def test_group_schedules_resolve_in_a_composed_config(tmp_path) -> None:
    """The `embeddings/lr` options interpolate the optimizer's init_learning_rate."""
    (tmp_path / "app.yaml").write_text("defaults:\n  - embeddings: empty\n  - _self_\n")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
            cfg = compose("app", overrides=["embeddings/lr=linear_ramp_to_cosine", "embeddings.optimizer.init_learning_rate=0.2"])
    finally:
        GlobalHydra.instance().clear()
    opt = cfg.embeddings.optimizer
    # Defaults of the option: ramp 1000 steps to the init rate, cosine to 0 at step 10000.
    assert lr_at(opt.learning_rate, 500, opt.init_learning_rate) == pytest.approx(0.1)
    assert lr_at(opt.learning_rate, 1000, opt.init_learning_rate) == pytest.approx(0.2)
    assert lr_at(opt.learning_rate, 5500, opt.init_learning_rate) == pytest.approx(0.1)
    assert lr_at(opt.learning_rate, 20000, opt.init_learning_rate) == 0.0


rates = st.floats(min_value=1e-6, max_value=10.0, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(lr=rates, ramp=st.integers(1, 10_000), data=st.data())
def test_ramp_to_constant_is_monotone_and_capped(lr: float, ramp: int, data) -> None:
    a = data.draw(st.integers(0, 2 * ramp))
    b = data.draw(st.integers(a, 2 * ramp))
    schedule = {"linear_ramp_to_constant": {"learning_rate": lr, "num_ramp_steps": ramp}}
    assert 0.0 <= lr_at(schedule, a, 0.0) <= lr_at(schedule, b, 0.0) <= lr


@settings(max_examples=200, deadline=None)
@given(lr=rates, final=rates, ramp=st.integers(1, 5_000), decay=st.integers(1, 5_000), data=st.data())
def test_ramp_to_cosine_ramps_up_then_stays_between_peak_and_final(
    lr: float, final: float, ramp: int, decay: int, data
) -> None:
    schedule = {
        "linear_ramp_to_cosine": {
            "learning_rate": lr,
            "final_learning_rate": final,
            "num_ramp_steps": ramp,
            "final_num_steps": ramp + decay,
        }
    }
    a = data.draw(st.integers(0, ramp - 1))
    b = data.draw(st.integers(a, ramp - 1))
    assert 0.0 <= lr_at(schedule, a, 0.0) <= lr_at(schedule, b, 0.0)
    # After the ramp: within [min, max] of the two rates (one rounding step of slack).
    lo, hi = min(final, lr), max(final, lr)
    tol = 4 * math.ulp(hi)
    for step in (ramp, data.draw(st.integers(ramp, ramp + 2 * decay)), ramp + decay, ramp + decay + 1):
        assert lo - tol <= lr_at(schedule, step, 0.0) <= hi + tol
