"""Paths users take every day and the engine once got silently wrong: in-place position ids, backend switches,
casts and moves before unpatching, copies and pickles, replace=True failures, patched() misuse."""

import copy
import io
import pickle

import pytest
import torch

import pos_swap
from conftest import outputs, tiny


def ids(length=20, seed=0):
    return torch.randint(3, 100, (1, length), generator=torch.Generator().manual_seed(seed))


# -- position ids changed in place --------------------------------------------------------------------------


@pytest.mark.parametrize("change", ["add_", "slice"])
def test_position_ids_changed_in_place_between_forwards(change):
    model = tiny("llama")
    pos_swap.patch(model, "dynamic", factor=2.0)
    expected = outputs(model, ids(10), position_ids=torch.arange(30, 40)[None])
    positions = torch.arange(10)[None]
    outputs(model, ids(10), position_ids=positions)  # frequencies of length 10
    if change == "add_":
        positions.add_(30)  # now 30..39: past the 32 trained positions, so the base grows
    else:
        positions[:] = torch.arange(30, 40)
    torch.testing.assert_close(outputs(model, ids(10), position_ids=positions), expected, rtol=0, atol=0)
