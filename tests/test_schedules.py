"""Noise schedules against their definitions, in float64."""

import math

import pytest
import torch

from diffusion.schedules import (
    CosineSchedule,
    GeometricSchedule,
    LinearSchedule,
    LogLinearSchedule,
    get_schedule,
)

ALL = [
    LogLinearSchedule(eps=1e-3),
    LogLinearSchedule(eps=0.0),
    GeometricSchedule(sigma_min=1e-4, sigma_max=20.0),
    CosineSchedule(eps=1e-3),
    LinearSchedule(sigma_min=0.0, sigma_max=10.0),
]
T = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)


@pytest.mark.parametrize("schedule", ALL, ids=repr)
def test_rate_is_derivative_of_total_noise(schedule):
    h = 1e-6
    finite_difference = (schedule.total_noise(T + h) - schedule.total_noise(T - h)) / (2 * h)
    torch.testing.assert_close(schedule.rate(T), finite_difference, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("schedule", ALL, ids=repr)
def test_derived_quantities_agree(schedule):
    sigma_bar = schedule.total_noise(T)
    torch.testing.assert_close(schedule.alpha(T), torch.exp(-sigma_bar), rtol=1e-12, atol=0)
    torch.testing.assert_close(schedule.mask_probability(T), 1 - torch.exp(-sigma_bar), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(
        schedule.elbo_weight(T), schedule.rate(T) / (torch.exp(sigma_bar) - 1), rtol=1e-10, atol=0
    )
    assert schedule.total_noise(T).dtype == torch.float64
    assert bool((schedule.rate(T) > 0).all())


def test_loglinear_masks_linearly_and_weights_one_over_t():
    schedule = LogLinearSchedule(eps=1e-3)
    sigma_bar = schedule.total_noise(T)
    torch.testing.assert_close(1 - torch.exp(-sigma_bar), (1 - 1e-3) * T, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(schedule.rate(T) / torch.expm1(sigma_bar), 1 / T, rtol=1e-10, atol=0)
    assert schedule.total_noise(torch.tensor(0.0, dtype=torch.float64)).item() == 0.0
    assert math.isclose(schedule.total_noise(1.0).item(), -math.log(1e-3), rel_tol=1e-12)


def test_geometric_endpoints_and_rate():
    schedule = GeometricSchedule(sigma_min=1e-4, sigma_max=20.0)
    assert math.isclose(schedule.total_noise(0.0).item(), 1e-4, rel_tol=1e-12)
    assert math.isclose(schedule.total_noise(1.0).item(), 20.0, rel_tol=1e-12)
    torch.testing.assert_close(schedule.rate(T), schedule.total_noise(T) * math.log(20.0 / 1e-4))


def test_cosine_alpha_is_shifted_cosine():
    schedule = CosineSchedule(eps=1e-3)
    expected = 1e-3 + (1 - 1e-3) * torch.cos(math.pi * T / 2)
    torch.testing.assert_close(schedule.alpha(T), expected, rtol=1e-12, atol=0)


def test_get_schedule_round_trips_and_rejects_unknown():
    for schedule in ALL:
        assert get_schedule(**schedule.to_dict()) == schedule
    with pytest.raises(ValueError, match="unknown schedule name='exponential'.*loglinear"):
        get_schedule("exponential")


@pytest.mark.parametrize(
    "factory, match",
    [
        (lambda: LogLinearSchedule(eps=1.0), "eps=1.0"),
        (lambda: LogLinearSchedule(eps=-0.1), "eps=-0.1"),
        (lambda: GeometricSchedule(sigma_min=0.0), "sigma_min=0.0"),
        (lambda: GeometricSchedule(sigma_min=1.0, sigma_max=0.5), "sigma_max=0.5"),
        (lambda: LinearSchedule(sigma_min=2.0, sigma_max=1.0), "sigma_max=1.0"),
        (lambda: CosineSchedule(eps=2.0), "eps=2.0"),
    ],
)
def test_bad_arguments_are_named(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()
