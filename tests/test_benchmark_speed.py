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


def test_atari_memory_per_placement(local_dataset):
    """The Atari buffer's memory for both --buffer-device placements: the analytic bytes are
    the frames (one 84x84 uint8 frame per row) plus the small per-row tensors; on a CPU the
    device is the host, so both placements hold the buffer in host memory."""
    import cql_qrdqn_atari as qrdqn

    local_dataset(speed.MEMORY_DATASET)
    rows = [speed.atari_memory_probe(speed.MEMORY_DATASET, p, CPU) for p in speed.PLACEMENTS]
    data = qrdqn.minari_data(qrdqn.load_minari_dataset(rows[0]["dataset"]), progress=False)
    n_rows, n_valid = len(data.frames), len(data.valid)
    expected = n_rows * (84 * 84 + 8 + 4 + 4) + n_valid * 8  # frames, actions, rewards, dones
    for r in rows:
        assert r["transitions"] == n_valid and r["buffer_bytes"] == expected
        assert r["host_buffer_bytes"] == expected and r["device_peak_bytes"] is None
        assert r["host_peak_growth_bytes"] >= 0
    text = "\n".join(speed.memory_lines(rows))
    mib_per_100k = expected * 1e5 / n_valid / 2**20
    # device placement on a CPU: the buffer is in host memory, which is the device's
    assert f"| device | {n_valid} | {mib_per_100k:.1f} | {mib_per_100k:.1f} (host) |" in text
    assert f"| cpu | {n_valid} | {mib_per_100k:.1f} | 0.0 (host) |" in text
