"""Speed measurement: the analytic CQL-SAC FLOP count, and a tiny end-to-end run."""

import pytest
import torch

from benchmark import speed
from benchmark.suites import CQL_SAC

CPU = torch.device("cpu")


@pytest.mark.parametrize("max_backup", [False, True])
@pytest.mark.parametrize("dims", [((32, 32), (16, 16, 16)), ((256, 256, 256), (256, 256, 256))])
def test_cql_sac_flops_match_torch_flop_counter(dims, max_backup):
    """The analytic count equals what torch's FlopCounterMode sees in the script's real
    update step (so the matmul-share column rests on a checked number)."""
    actor, critic = dims
    case = speed.Case(CQL_SAC, "t", "", "pendulum-expert", 5, 2,
                      (("actor_hidden_dims", actor), ("critic_hidden_dims", critic),
                       ("max_backup", max_backup), ("batch_size", 16)))
    step = speed.build_step(case, "eager", CPU)
    expected = speed.cql_sac_flops(5, 2, actor, critic, 16, 10, max_backup=max_backup)
    assert speed.counted_flops(step) == expected
    assert expected > speed.cql_sac_flops(5, 2, actor, critic, 16, 5, max_backup=max_backup)


def test_mlp_flops_by_hand():
    # 4 -> 8 -> 1 on 10 samples: forward 2*10*(32+8); weight grads the same; input grads of
    # the second layer only (the first layer's input needs none)
    assert speed.mlp_flops(10, [4, 8, 1], False, False) == 800
    assert speed.mlp_flops(10, [4, 8, 1], True, True) == 800 + 800 + 160
    assert speed.mlp_flops(10, [4, 8, 1], False, True, first_input_grad=True) == 800 + 800


def test_speed_table_end_to_end(tmp_path, local_dataset):
    local_dataset("pendulum-expert")
    out = tmp_path / "speed.md"
    assert speed.main(["--sizes", "small", "--modes", "eager", "--seconds", "0.05",
                       "--min-steps", "1", "--warmup", "1", "--no-loading", "--device", "cpu",
                       "--matmul-n", "512",
                       "--out", str(out)]) == 0
    text = out.read_text()
    for name in ("CQL-SAC", "CQL-QR-DQN", "Cal-QL fine-tuning"):
        assert f"| {name} | small |" in text
    assert "512x512 float32 matmul" in text and "- Machine:" in text
    share = text.split("| small | eager | 0.480 | 0.480 |")[1].split("|")[2]
    assert share.strip().endswith("%")
    probe = speed.load_probe(CQL_SAC, "pendulum-expert", CPU)
    assert probe["transitions"] == 100 * 200 and probe["seconds"] > 0
    assert probe["host_peak_mib"] > 20_000 * 9 * 4 / 2**20  # at least the float32 buffer
