from __future__ import annotations

import optitool_lowrank
import pytest
import torch
from optitool_lowrank import LowRank

import optitool
from optitool import RunError
from optitool.testing import check_pass_contract

PIPELINE = """
[model]
source = "python"
factory = "optitool.testing:tiny_mlp"
kwargs = {{ hidden = 64 }}
[model.inputs]
x = ["batch", 16]
[[passes]]
pass = "acme.lowrank"
{settings}
"""


def test_contract(tmp_path):
    check_pass_contract(LowRank, settings={"rank": 4}, tmp_path=tmp_path)


def test_full_energy_keeps_outputs_and_low_rank_shrinks(optitool_run):
    result = optitool_run(PIPELINE.format(settings="rank = 4"), plugins=(optitool_lowrank,))
    stages = result.report["stages"]
    assert stages[1]["metrics"]["parameters"] < stages[0]["metrics"]["parameters"]
    assert stages[1]["metrics"]["ranks"]["2"] == 4
    assert result.hook_calls == ["optitool_pipeline_start", "optitool_pass_finished", "optitool_report_written"]


def test_exact_at_full_rank_of_a_low_rank_weight():
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 64)
    layer.weight.data = torch.randn(64, 3) @ torch.randn(3, 64)
    model = optitool.TorchModel(torch.nn.Sequential(layer))
    out = LowRank(LowRank.Config(energy=0.999999)).run(model, _ctx())
    x = torch.randn(5, 64)
    assert torch.allclose(out.module(x), torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-3)


def test_useless_rank_is_a_clear_error(optitool_run):
    with pytest.raises(RunError, match="no Linear layer would get smaller"):
        optitool_run(PIPELINE.format(settings="rank = 60"), plugins=(optitool_lowrank,))


def test_settings_are_validated():
    with pytest.raises(ValueError, match="exactly one of rank or energy"):
        LowRank.Config(rank=2, energy=0.5)



def _ctx():
    import logging
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp())
    return optitool.PassContext(device="cpu", seed=0, run_dir=folder, stage_dir=folder, inputs=None,
                                logger=logging.getLogger("test"))
