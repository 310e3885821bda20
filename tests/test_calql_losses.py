"""Cal-QL's one change to CQL against brute-force computations."""

import math
from dataclasses import replace

import pytest
import torch

import calql_finetune as calql

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def brute_force(q_rand, q_pi, logp_pi, q_next, logp_next, mc, d, temp):
    """Loops over critics, states and samples: calibrate policy actions on the raw Q, then
    the IS correction, then T * log sum exp(./T)."""
    e, b, n = q_rand.shape
    out = torch.empty(e, b, dtype=torch.float64)
    for i in range(e):
        for j in range(b):
            terms = [float(q_rand[i, j, k]) - d * math.log(0.5) for k in range(n)]
            for q, logp in ((q_pi, logp_pi), (q_next, logp_next)):
                for k in range(n):
                    value = float(q[i, j, k])
                    if mc is not None:
                        value = max(value, float(mc[j]))
                    terms.append(value - float(logp[j, k]))
            out[i, j] = temp * math.log(sum(math.exp(t / temp) for t in terms))
    return out


def random_inputs(seed: int, e: int = 2, b: int = 5, n: int = 4):
    gen = torch.Generator().manual_seed(seed)
    q = [torch.randn(e, b, n, generator=gen, dtype=torch.float64) * 3 for _ in range(3)]
    logps = [torch.randn(b, n, generator=gen, dtype=torch.float64) for _ in range(2)]
    mc = torch.randn(b, generator=gen, dtype=torch.float64) * 3
    return q, logps, mc


@pytest.mark.parametrize("temp", [1.0, 0.5])
def test_calibrated_logsumexp_matches_brute_force(temp):
    (q_rand, q_pi, q_next), (logp_pi, logp_next), mc = random_inputs(0)
    d = 3
    got, stats = calql.calql_logsumexp(q_rand, q_pi, logp_pi, q_next, logp_next, mc, d, temp)
    want = brute_force(q_rand, q_pi, logp_pi, q_next, logp_next, mc, d, temp)
    torch.testing.assert_close(got, want)
    # bound rate: share of policy-action Q-values below V_mu (official logging)
    below = (q_pi < mc.reshape(1, -1, 1)).double().mean()
    torch.testing.assert_close(stats["bound_rate_pi"], below.float())
    # CQL (no calibration) is the same computation without the max
    plain, stats = calql.calql_logsumexp(q_rand, q_pi, logp_pi, q_next, logp_next, None, d, temp)
    torch.testing.assert_close(plain, brute_force(q_rand, q_pi, logp_pi, q_next, logp_next,
                                                  None, d, temp))
    assert stats == {} and not torch.allclose(plain, got)


def test_max_is_taken_before_the_importance_sampling_correction():
    """Official order: max(Q, V) - log pi, not max(Q - log pi, V) (the paper's listing)."""
    (q_rand, q_pi, q_next), (logp_pi, logp_next), mc = random_inputs(1)
    got, _ = calql.calql_logsumexp(q_rand, q_pi, logp_pi, q_next, logp_next, mc, 2)
    lower = mc.reshape(1, -1, 1)
    after = torch.cat([q_rand - 2 * math.log(0.5), torch.maximum(q_pi - logp_pi, lower),
                       torch.maximum(q_next - logp_next, lower)], -1).logsumexp(-1)
    assert not torch.allclose(got, after)


def test_random_actions_are_never_calibrated():
    b, n, d = 4, 3, 2
    q_rand = torch.full((2, b, n), -50.0, requires_grad=True)
    q_pi = torch.full((2, b, n), -80.0, requires_grad=True)
    q_next = torch.full((2, b, n), -80.0, requires_grad=True)
    logp = torch.zeros(b, n)
    mc = torch.full((b,), 20.0)  # far above every Q
    got, stats = calql.calql_logsumexp(q_rand, q_pi, logp, q_next, logp, mc, d)
    # policy actions raised to V_mu = 20; random ones stay at -50 - log(0.5^d)
    want = torch.logsumexp(torch.tensor([20.0] * (2 * n) + [-50.0 - d * math.log(0.5)] * n), 0)
    torch.testing.assert_close(got, want.expand(2, b))
    assert stats["bound_rate_pi"] == 1.0 and stats["bound_rate_pi_next"] == 1.0
    got.sum().backward()
    assert q_rand.grad.abs().min() > 0  # the random-action Q-values are still pushed down
    assert q_pi.grad.abs().max() == 0 and q_next.grad.abs().max() == 0  # calibrated: no push


def tiny_agent_and_batch(seed: int = 0, b: int = 16, obs_dim: int = 3, action_dim: int = 2):
    args = replace(calql.preset_args("pointmaze-binary"), run_dir="unused",
                   actor_hidden_dims=(16, 16), critic_hidden_dims=(16, 16), cql_n_actions=3,
                   batch_size=b)
    torch.manual_seed(seed)
    agent = calql.Agent(obs_dim, action_dim, args)
    gen = torch.Generator().manual_seed(seed)
    batch = dict(obs=torch.randn(b, obs_dim, generator=gen),
                 next_obs=torch.randn(b, obs_dim, generator=gen),
                 actions=torch.rand(b, action_dim, generator=gen) * 2 - 1,
                 rewards=torch.randn(b, generator=gen), dones=torch.zeros(b),
                 mc_returns=torch.randn(b, generator=gen))
    return args, agent, batch


def losses(agent, batch, args, seed=1):
    torch.manual_seed(seed)
    return calql.compute_losses(agent, batch, args, False, args.cql_weight)


def test_calql_is_cql_when_the_bound_never_binds_and_differs_when_it_does():
    args, agent, batch = tiny_agent_and_batch()
    cql_args = calql.replace(args, enable_calql=False)
    low = dict(batch, mc_returns=torch.full_like(batch["mc_returns"], -1e6))
    total_cal, m_cal = losses(agent, low, args)
    total_cql, m_cql = losses(agent, low, cql_args)
    assert total_cal.item() == total_cql.item()  # everything else equal
    assert m_cal["bound_rate_pi"] == 0
    high = dict(batch, mc_returns=torch.full_like(batch["mc_returns"], 1e3))
    total_high, m_high = losses(agent, high, args)
    assert m_high["bound_rate_pi"] == 1 and m_high["q_ood"] > 900
    assert m_high["calib_below_share"] == 1 and m_cal["calib_below_share"] == 0
    assert total_high.item() != total_cql.item()


def test_cql_term_matches_a_direct_computation_from_the_critics():
    args, agent, batch = tiny_agent_and_batch(seed=3)
    args = calql.replace(args, cql_weight=2.0)
    torch.manual_seed(7)
    q_data = agent.critic(batch["obs"], batch["actions"])
    penalty, _, metrics = calql.cql_term(agent, batch, args, q_data, 2.0)
    # Re-draw the same proposals with the same seed and compute the gap by hand.
    torch.manual_seed(7)
    b, n = 16, 3
    a_rand = torch.rand(b, n, 2) * 2 - 1
    a_cur, logp_cur = agent.actor(batch["obs"].unsqueeze(1).expand(-1, n, -1))
    a_next, logp_next = agent.actor(batch["next_obs"].unsqueeze(1).expand(-1, n, -1))
    rep = batch["obs"].unsqueeze(1).expand(-1, n, -1)
    with torch.no_grad():
        q_rand, q_cur, q_next = (agent.critic(rep, a) for a in (a_rand, a_cur, a_next))
        mc = batch["mc_returns"].reshape(1, -1, 1)
        cat = torch.cat([q_rand - 2 * math.log(0.5),
                         torch.maximum(q_cur, mc) - logp_cur,  # pi(s') actions scored at s
                         torch.maximum(q_next, mc) - logp_next], -1)
        gap = (cat.logsumexp(-1) - q_data).mean(-1)
    torch.testing.assert_close(penalty.detach(), 2.0 * gap, rtol=1e-5, atol=1e-5)
    # the helper returns its metrics (nothing is written into a caller's dict)
    assert {"cql_gap", "q_ood", "alpha_prime", "bound_rate_pi", "bound_rate_pi_next"} <= set(
        metrics)
    torch.testing.assert_close(metrics["cql_gap"], gap.mean(), rtol=1e-5, atol=1e-5)


def test_gradients_are_disjoint_and_the_penalty_never_trains_the_actor():
    args, agent, batch = tiny_agent_and_batch(seed=2)
    torch.manual_seed(0)
    total, _ = calql.compute_losses(agent, batch, args, False, args.cql_weight)
    total.backward()
    actor_grads = [p.grad.clone() for p in agent.actor.parameters()]
    agent.zero_grad()
    # The actor loss alone gives the same actor gradients: the CQL/Bellman terms add none.
    torch.manual_seed(0)
    obs = batch["obs"]
    a_pi, logp_pi = agent.actor(obs)
    q_pi = agent.critic(obs, a_pi, detach=True).min(0).values
    (agent.log_alpha.exp().detach() * logp_pi - q_pi).mean().backward()
    for g, p in zip(actor_grads, agent.actor.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)
    assert all(p.grad is None for p in agent.target_critic.parameters())


def test_calibration_metrics_share_and_mean():
    """The training metrics calib_below_share / calib_q_minus_vmu: share of batch states with
    min_j Q_j(s, a~pi(s)) < V_mu(s), and mean Q - V_mu (a~pi is compute_losses' first draw)."""
    args, agent, batch = tiny_agent_and_batch(seed=4)
    torch.manual_seed(0)
    a_pi, _ = agent.actor(batch["obs"])
    q = agent.critic(batch["obs"], a_pi).min(0).values.detach()
    batch["mc_returns"] = q + torch.linspace(-1, 1, 16)  # half the states above Q
    _, stats = losses(agent, batch, args, seed=0)
    assert stats["calib_below_share"] == 0.5
    assert float(stats["calib_q_minus_vmu"]) == pytest.approx(0.0, abs=1e-5)
