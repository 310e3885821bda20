"""`--compile` computes the eager losses, in all three scripts, on CPU.

torch.compile is checked through the public `backend="aot_eager"`: TorchDynamo captures the
loss function and AOTAutograd traces its forward and backward, exactly as for the default
inductor backend, but the captured graphs run with eager kernels. Random ops then draw
from the same generator in the same order as in eager mode, so a short run must reproduce
the eager run's numbers; a capture that changed the math (a wrong guard, a dropped
`detach`, a graph break that reorders the draws) would not. Inductor itself draws random
numbers with its own generator (no public switch makes it use eager's): the script's
inductor path is compared with eager's spread over seeds in tests/test_cql_sac_run.py and
run end to end in tests/test_cql_qrdqn_run.py.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import calql_finetune
import cql_qrdqn_atari
import cql_sac_continuous

# (module, --env, dataset name for benchmark/datasets.py, tiny overrides, loss keys)
CASES = {
    "cql_sac": (cql_sac_continuous, "pendulum-medium", "pendulum-medium",
                dict(total_steps=12, eval_every=12, eval_episodes=1, actor_hidden_dims=(16, 16),
                     critic_hidden_dims=(16, 16), batch_size=16,
                     cql_n_actions=3, log_every=4, bc_steps=4),
                ("critic_loss", "actor_loss", "q_data", "cql_gap")),
    "calql": (calql_finetune, "pointmaze-binary", "pointmaze-sparse",
              dict(offline_steps=8, offline_eval_every=8, online_steps=10, eval_every=10,
                   eval_episodes=1, actor_hidden_dims=(16, 16),
                   critic_hidden_dims=(16, 16), batch_size=16, cql_n_actions=3, log_every=4),
              ("critic_loss", "actor_loss", "q_data", "cql_gap")),
    "cql_qrdqn": (cql_qrdqn_atari, "cartpole-expert", "cartpole-expert",
                  dict(total_steps=12, eval_every=12, eval_episodes=1, hidden_dims=(16,),
                       batch_size=16, num_quantiles=8, log_every=4),
                  ("loss", "qr_loss", "cql_loss", "q_data")),
}


def run(name: str, run_dir: Path, **overrides) -> dict:
    module, env, _, tiny, _ = CASES[name]
    fields = module.Args.__dataclass_fields__
    values = {k: v for k, v in {**tiny, **overrides}.items() if k in fields}
    args = replace(module.preset_args(env), run_dir=str(run_dir), progress=False,
                   device="cpu", **values)
    module.main(args)
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


@pytest.fixture(params=sorted(CASES))
def case(request, local_dataset, one_torch_thread):
    local_dataset(CASES[request.param][2])
    torch._dynamo.reset()
    yield request.param
    torch._dynamo.reset()


def test_compiled_capture_reproduces_the_eager_losses(case, tmp_path, monkeypatch):
    eager = run(case, tmp_path / "eager", seed=1)
    compiled_fns = []

    def compile_aot_eager(fn, **kwargs):
        compiled_fns.append(fn)
        return real_compile(fn, **{**kwargs, "backend": "aot_eager"})

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    compiled = run(case, tmp_path / "compiled", seed=1, compile=True)
    assert compiled_fns, "--compile did not go through torch.compile"
    for key in CASES[case][4]:
        assert compiled[key] == pytest.approx(eager[key], rel=1e-5, abs=1e-6), key
    assert compiled["step"] == eager["step"]
