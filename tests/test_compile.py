"""`--compile` (the whole update compiled) computes the eager update, in all three scripts, on
CPU: the run's losses, the parameters after k updates from the same state, resume, and no
recompilation at the warm-start end, Cal-QL's phase switch or QR-DQN's target copies.

torch.compile is checked through the public `backend="aot_eager"`: TorchDynamo captures the
loss function and AOTAutograd traces its forward and backward, exactly as for the default
inductor backend, but the captured graphs run with eager kernels. Random ops then draw
from the same generator in the same order as in eager mode, so a short run must reproduce
the eager run's numbers; a capture that changed the math (a wrong guard, a dropped
`detach`, a graph break that reorders the draws) would not. Inductor itself draws random
numbers with its own generator (no public switch makes it use eager's): the script's
inductor path is compared with eager's spread over seeds in tests/test_cql_sac_run.py and
run end to end in tests/test_cql_qrdqn_run.py.

The compiled update is not bit-identical even with eager kernels: Dynamo traces Adam with
tensor step counters, so its bias corrections are float32 tensor arithmetic where the eager
foreach Adam uses Python floats (about one float32 ulp per update). The first update's
losses are compared exactly, the parameters after k updates to TOL.
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
from benchmark import speed

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
    for key in CASES[case][4]:  # traced Adam's ulps (docstring), grown over the run's updates
        assert compiled[key] == pytest.approx(eager[key], rel=1e-3, abs=1e-5), key
    assert compiled["step"] == eager["step"]


# ---- the whole compiled update vs the eager one, Trainer by Trainer ----------------------

TOL = dict(rtol=1e-5, atol=1e-6)  # Adam's float32 bias corrections when traced (docstring)
CPU = torch.device("cpu")
# (speed.py case for the shapes, Trainer overrides): a BC warm start of 2 updates (CQL-SAC,
# Cal-QL), QR-DQN's target copied every 2 updates; Cal-QL goes online after update 3
TRAINERS = {
    "cql_sac": (speed.CASES[1], dict(bc_steps=2, lagrange=True)),
    "calql": (speed.CASES[5], dict(bc_steps=2, cql_weight_online=0.25)),
    "cql_qrdqn": (speed.CASES[3], dict(target_update_every=2)),
}
SMALL = dict(actor_hidden_dims=(16, 16), critic_hidden_dims=(16, 16), hidden_dims=(16,),
             num_quantiles=8, batch_size=32, cql_n_actions=3)


def trainer_args(name: str, compile: bool):
    case, over = TRAINERS[name]
    module = speed.MODULES[case.script]
    fields = module.Args.__dataclass_fields__
    values = {k: v for k, v in {**SMALL, **over}.items() if k in fields}
    return module, case, replace(module.preset_args(case.env), device="cpu", compile=compile,
                                 **values)


def make_trainer(name: str, compile: bool, state: dict | None = None):
    module, case, args = trainer_args(name, compile)
    torch.manual_seed(0)
    agent = module.Agent(case.obs_dim, case.action_dim, args)
    trainer = module.Trainer(agent, args, CPU)
    if state is not None:  # a resume: the checkpoint's agent and Trainer state
        agent.load_state_dict(state["agent"])
        trainer.load_state_dict(state["trainer"])
    return agent, trainer


def updates(name: str, trainer, batches: list, first: int) -> list[dict]:
    """trainer.step on each batch; Cal-QL switches to its online phase after update 3."""
    out = []
    for i, batch in enumerate(batches, start=first):
        if name == "calql" and i == 4:
            trainer.start_online()
        out.append(trainer.step(batch))
    return out


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_compiled_update_is_the_eager_update_and_resumes(name, tmp_path, monkeypatch,
                                                          one_torch_thread):
    """6 updates eager, and compiled: 4 updates, a checkpoint through Trainer.state_dict (and
    torch.save: the optimizer state round-trips), a fresh compiled Trainer loaded from it, 2
    more. Same parameters, targets and optimizer state; a counting backend (public
    torch.compile API) sees the graphs of the first update, one more loss graph when the BC
    warm start ends (update 3) and none after: not at Cal-QL's phase switch (update 4: the
    CQL weight is a tensor), not at QR-DQN's target copies (a mask), not on resume beyond
    the new Trainer's first update."""
    _, case, args = trainer_args(name, False)
    buffer = speed.random_buffer(replace(case, overrides=()), CPU)
    batches = [buffer.sample(args.batch_size) for _ in range(6)]
    torch.compiler.reset()
    graphs: list[int] = []

    def counting(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend=counting))
    agent, trainer = make_trainer(name, True)
    torch.manual_seed(1)
    first = updates(name, trainer, batches[:1], 1)
    per_update = len(graphs)
    counts = []
    for i in range(2, 5):
        updates(name, trainer, batches[i - 1:i], i)
        counts.append(len(graphs))
    switch = 1 if name != "cql_qrdqn" else 0  # the loss graph with bc False
    assert counts == [per_update, per_update + switch, per_update + switch], graphs
    torch.save(dict(agent=agent.state_dict(), trainer=trainer.state_dict(),
                    rng=torch.get_rng_state()), tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    agent, trainer = make_trainer(name, True, state)
    if name == "calql":
        trainer.start_online()  # main does so on resume of the online phase
    torch.set_rng_state(state["rng"])
    updates(name, trainer, batches[4:], 5)

    eager_agent, eager_trainer = make_trainer(name, False)
    torch.manual_seed(1)
    eager = updates(name, eager_trainer, batches, 1)
    assert {k: v.item() for k, v in first[0].items()} == \
        {k: v.item() for k, v in eager[0].items()}  # the first update's losses: exact
    compiled_params, eager_params = agent.state_dict(), eager_agent.state_dict()
    for key, value in eager_params.items():
        torch.testing.assert_close(compiled_params[key], value, **TOL, msg=key)
    if name == "cql_qrdqn":  # the last copy (update 6) made the target the online network
        for key, value in agent.q.state_dict().items():
            assert torch.equal(agent.target_q.state_dict()[key], value)
    opt_state = lambda t: [s for o in t.optimizers.values()
                           for s in o.state_dict()["state"].values()]
    for compiled_s, eager_s in zip(opt_state(trainer), opt_state(eager_trainer), strict=True):
        for k in eager_s:
            torch.testing.assert_close(compiled_s[k], eager_s[k], **TOL, check_dtype=False)
    assert trainer.updates == eager_trainer.updates == 6
