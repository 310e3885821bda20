"""The math of every CQL-SAC loss term against independent brute-force computations."""

import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal, TransformedDistribution
from torch.distributions.transforms import TanhTransform

import cql_sac_continuous as cql


def make_args(**overrides) -> cql.Args:
    return cql.replace(cql.preset_args("pendulum-medium"), **overrides)


# ---------------------------------------------------------------- importance sampling (App. F)


def q_function(a: torch.Tensor) -> torch.Tensor:
    """A bumpy 1-D Q(s, .) whose logsumexp over [-1, 1] we know by quadrature."""
    return 3.0 * torch.sin(3.0 * a) + 2.0 * a**2


def exact_log_integral() -> float:
    grid = torch.linspace(-1, 1, 200_001, dtype=torch.float64)
    return math.log(torch.trapezoid(torch.exp(q_function(grid)), grid).item())


def is_estimate(n: int, seed: int) -> float:
    """Estimate of log int exp Q(a) da from N uniform and 2x N tanh-Gaussian samples."""
    gen = torch.Generator().manual_seed(seed)
    batch = 64  # independent states with the same Q, averaged to cut the noise
    a_rand = torch.rand(batch, n, 1, generator=gen, dtype=torch.float64) * 2 - 1
    pis = []
    for mean, std in ((0.4, 0.5), (-0.3, 0.8)):
        u = mean + std * torch.randn(batch, n, 1, generator=gen, dtype=torch.float64)
        logp = cql.tanh_gaussian_log_prob(u, torch.full_like(u, mean),
                                          torch.full_like(u, math.log(std)))
        pis.append((torch.tanh(u), logp))
    (a_pi, logp_pi), (a_next, logp_next) = pis
    q = lambda a: q_function(a[..., 0])[None]  # [E=1, B, N]
    lse = cql.cql_logsumexp_is(q(a_rand), q(a_pi), logp_pi, q(a_next), logp_next, action_dim=1)
    return (lse - math.log(3 * n)).mean().item()  # the constant the official code omits


def test_importance_sampled_logsumexp_converges_to_exact_value():
    exact = exact_log_integral()
    errors = {n: abs(np.mean([is_estimate(n, s) for s in range(3)]) - exact)
              for n in (4, 64, 4096)}
    assert errors[4096] < 0.01, errors
    assert errors[4] > errors[4096], errors  # consistency: the error shrinks as N grows


def test_is_logsumexp_matches_brute_force_and_temperature():
    torch.manual_seed(0)
    e, b, n, d, temp = 2, 3, 5, 4, 0.7
    q_rand, q_pi, q_next = (torch.randn(e, b, n) * 3 for _ in range(3))
    logp_pi, logp_next = torch.randn(b, n), torch.randn(b, n)
    got = cql.cql_logsumexp_is(q_rand, q_pi, logp_pi, q_next, logp_next, d, temp)
    want = torch.empty(e, b)
    for i in range(e):
        for j in range(b):
            terms = [(q_rand[i, j, k] - d * math.log(0.5)) for k in range(n)]
            terms += [q_pi[i, j, k] - logp_pi[j, k] for k in range(n)]
            terms += [q_next[i, j, k] - logp_next[j, k] for k in range(n)]
            want[i, j] = temp * math.log(sum(math.exp(t / temp) for t in terms))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_plain_logsumexp_includes_data_q():
    torch.manual_seed(1)
    q_rand, q_pi, q_next = (torch.randn(2, 3, 4) for _ in range(3))
    q_data = torch.randn(2, 3)
    got = cql.cql_logsumexp_plain(q_rand, q_pi, q_next, q_data, temp=2.0)
    for i in range(2):
        for j in range(3):
            vals = [*q_rand[i, j], q_data[i, j], *q_next[i, j], *q_pi[i, j]]
            want = 2.0 * math.log(sum(math.exp(v / 2.0) for v in vals))
            assert got[i, j].item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("data_term", [True, False])
def test_penalty_gap_and_eq1_variant(data_term):
    push = torch.tensor([[1.0, 4.0], [2.0, -1.0]])
    q_data = torch.tensor([[0.5, 1.0], [3.0, 0.0]])
    gap = cql.cql_penalty(push, q_data, data_term, -math.inf, math.inf)
    want = [(1.0 - 0.5 + 4.0 - 1.0) / 2, (2.0 - 3.0 - 1.0 - 0.0) / 2] if data_term \
        else [(1.0 + 4.0) / 2, (2.0 - 1.0) / 2]
    torch.testing.assert_close(gap, torch.tensor(want))
    clipped = cql.cql_penalty(push, q_data, True, -0.5, 2.0)
    torch.testing.assert_close(clipped, torch.tensor([(0.5 + 2.0) / 2, (-0.5 - 0.5) / 2]))


# ---------------------------------------------------------------- the penalty inside the agent


def small_agent(**overrides):
    args = make_args(actor_hidden_dims=(16, 16), critic_hidden_dims=(16, 16), **overrides)
    torch.manual_seed(0)
    return cql.Agent(3, 2, args), args


def random_batch(b: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return dict(obs=torch.randn(b, 3, generator=g), next_obs=torch.randn(b, 3, generator=g),
                actions=torch.rand(b, 2, generator=g) * 1.8 - 0.9,
                rewards=torch.randn(b, generator=g), dones=torch.zeros(b))


def test_cql_term_matches_manual_computation_and_never_trains_the_actor():
    agent, args = small_agent(cql_weight=2.0)
    batch = random_batch()
    q_data = agent.critic(batch["obs"], batch["actions"])
    torch.manual_seed(7)
    penalty, alpha_prime_loss, metrics = cql.cql_term(agent, batch, args, q_data)
    assert set(metrics) == {"cql_gap", "q_ood", "alpha_prime"}  # returned, not written
    # Redo by hand with the same random draws: uniform, pi(s), pi(s'), all scored at s.
    torch.manual_seed(7)
    b, n = 32, args.cql_n_actions
    a_rand = torch.rand(b, n, 2) * 2 - 1
    with torch.no_grad():
        a_cur, logp_cur = agent.actor(batch["obs"].unsqueeze(1).expand(-1, n, -1))
        a_next, logp_next = agent.actor(batch["next_obs"].unsqueeze(1).expand(-1, n, -1))
    s = batch["obs"].unsqueeze(1).expand(-1, n, -1)
    rows = []
    for k in range(2):  # each critic separately
        q = lambda a, k=k: agent.critic(s, a)[k]
        cat = torch.cat([q(a_rand) - 2 * math.log(0.5), q(a_cur) - logp_cur,
                         q(a_next) - logp_next], -1)
        rows.append((torch.logsumexp(cat, -1) - q_data[k]).mean())
    torch.testing.assert_close(penalty, 2.0 * torch.stack(rows), rtol=1e-5, atol=1e-5)
    assert alpha_prime_loss.item() == 0.0
    penalty.sum().backward()
    assert all(p.grad is None for p in agent.actor.parameters())
    assert all(p.grad is not None for p in agent.critic.parameters())


def test_penalty_gradient_lowers_ood_q_and_raises_data_q():
    """Train a critic on the penalty alone: Q at data actions rises, elsewhere it falls."""
    agent, args = small_agent(cql_weight=1.0)
    batch = random_batch(64)
    batch["actions"] = torch.full_like(batch["actions"], 0.5)  # the data's only action
    probe = torch.tensor([[-0.8, -0.8], [0.9, -0.9], [-0.5, 0.9]])  # far from the data
    obs = batch["obs"][:1].expand(len(probe), -1)
    opt = torch.optim.Adam(agent.critic.parameters(), lr=1e-2)
    q_data0 = agent.critic(batch["obs"], batch["actions"]).mean().item()
    q_ood0 = agent.critic(obs, probe).mean().item()
    for _ in range(50):
        opt.zero_grad()
        q_data = agent.critic(batch["obs"], batch["actions"])
        cql.cql_term(agent, batch, args, q_data)[0].sum().backward()
        opt.step()
    assert agent.critic(batch["obs"], batch["actions"]).mean().item() > q_data0 + 0.5
    assert agent.critic(obs, probe).mean().item() < q_ood0 - 0.5


# ---------------------------------------------------------------- Lagrange (Eq. 30)


@pytest.mark.parametrize("form", ["calql", "cql"])
@pytest.mark.parametrize("gap_value,direction", [(3.0, +1), (0.2, -1)])
def test_lagrange_alpha_prime_rises_above_tau_and_falls_below(form, gap_value, direction):
    log_ap = torch.nn.Parameter(torch.zeros(()))
    opt = torch.optim.Adam([log_ap], lr=0.1)
    gap = torch.full((2,), gap_value, requires_grad=True)
    for _ in range(5):
        opt.zero_grad()
        penalty, loss, alpha_prime = cql.lagrange_terms(gap, log_ap, weight=1.0, tau=1.0,
                                                        form=form)
        loss.backward()
        opt.step()
    assert direction * log_ap.item() > 0.3
    # The critic sees alpha' as a constant: its gradient w.r.t. the gap is alpha' * w.
    penalty.sum().backward()
    torch.testing.assert_close(gap.grad, alpha_prime.detach().expand(2))


def test_lagrange_forms_differ_only_in_where_the_weight_sits():
    gap, log_ap = torch.tensor([2.0, 4.0]), torch.tensor(math.log(3.0))
    calql, _, _ = cql.lagrange_terms(gap, log_ap, weight=5.0, tau=1.0, form="calql")
    orig, _, _ = cql.lagrange_terms(gap, log_ap, weight=5.0, tau=1.0, form="cql")
    torch.testing.assert_close(calql, 3.0 * 5.0 * (gap - 1.0))
    torch.testing.assert_close(orig, 3.0 * (5.0 * gap - 1.0))


# ---------------------------------------------------------------- networks


def test_tanh_gaussian_log_prob_matches_torch_distributions():
    torch.manual_seed(0)
    mean, log_std = torch.randn(100, 3), torch.randn(100, 3).clamp(-2, 1)
    u = mean + log_std.exp() * torch.randn(100, 3)
    ref = TransformedDistribution(Normal(mean, log_std.exp()), [TanhTransform()])
    a = torch.tanh(u).clamp(-1 + 1e-6, 1 - 1e-6)
    mine = cql.tanh_gaussian_log_prob(u, mean, log_std)
    torch.testing.assert_close(mine, ref.log_prob(a).sum(-1), rtol=1e-3, atol=1e-3)


def test_fused_critic_equals_two_separate_mlps():
    torch.manual_seed(0)
    critic = cql.FusedCritic(3, 2, (8, 8), init="pytorch")
    obs, act = torch.randn(5, 4, 3), torch.rand(5, 4, 2)
    got = critic(obs, act)  # [2, 5, 4]
    x = torch.cat([obs, act], -1)
    for k in range(2):
        h = x
        for i, layer in enumerate(critic.layers):
            h = h @ layer.weight[k] + layer.bias[k, 0]
            h = torch.relu(h) if i < len(critic.layers) - 1 else h
        torch.testing.assert_close(got[k], h[..., 0])
    torch.testing.assert_close(critic(obs, act, detach=True), got.detach())
    assert not critic(obs, act, detach=True).requires_grad  # the actor's view of the critic


def test_orthogonal_init_gains():
    critic = cql.FusedCritic(3, 1, (64, 64), init="orthogonal")
    w = critic.layers[1].weight[0]  # [in, out] square: orthogonal times sqrt(2)
    torch.testing.assert_close(w.T @ w, 2.0 * torch.eye(64), atol=1e-4, rtol=1e-4)
    last = critic.layers[-1].weight[1]
    assert last.norm().item() == pytest.approx(1e-2, rel=1e-3)
    assert not torch.equal(critic.layers[0].weight[0], critic.layers[0].weight[1])


# ---------------------------------------------------------------- backups and the full loss


@pytest.mark.parametrize("backup_entropy,max_backup", [(True, False), (False, False),
                                                       (False, True), (True, True)])
def test_bellman_target_backups(backup_entropy, max_backup):
    agent, args = small_agent(backup_entropy=backup_entropy, max_backup=max_backup,
                              max_backup_form="calql")  # the rlkit form: test_the_two_max_...
    batch = random_batch(8)
    batch["dones"][::2] = 1.0
    alpha = torch.tensor(0.3)
    torch.manual_seed(11)
    got = cql.bellman_target(agent, batch, args, alpha)
    torch.manual_seed(11)
    n = args.cql_n_actions if max_backup else 1
    with torch.no_grad():
        a, logp = agent.actor(batch["next_obs"].unsqueeze(1).expand(-1, n, -1)
                              if max_backup else batch["next_obs"])
        a, logp = a.reshape(8, n, 2), logp.reshape(8, n)
        want = torch.empty(8)
        for i in range(8):
            vals = [min(agent.target_critic(batch["next_obs"][i], a[i, k])[c].item()
                        for c in range(2)) for k in range(n)]
            best = int(np.argmax(vals))  # max over sampled actions of the twin minimum
            v = vals[best] - (alpha.item() * logp[i, best].item() if backup_entropy else 0.0)
            want[i] = batch["rewards"][i] + 0.99 * (1 - batch["dones"][i]) * v
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_compute_losses_gradients_are_disjoint():
    """Actor loss trains only the actor; the CQL and Bellman terms only the critics."""
    agent, args = small_agent(lagrange=True)
    total, metrics = cql.compute_losses(agent, random_batch(), args, bc=False)
    actor_grads = torch.autograd.grad(metrics["actor_loss"], list(agent.critic.parameters()),
                                      allow_unused=True, retain_graph=True)
    assert all(g is None for g in actor_grads)
    others = [agent.log_alpha, agent.log_alpha_prime]  # alpha is detached in the actor loss
    assert all(g is None for g in torch.autograd.grad(metrics["actor_loss"], others,
                                                      allow_unused=True, retain_graph=True))
    # Neither the critic loss nor the alpha / alpha' losses reach the actor (what reaches it
    # is the actor loss, cancelled exactly).
    rest = torch.autograd.grad(total - metrics["actor_loss"], list(agent.actor.parameters()),
                               allow_unused=True, retain_graph=True)
    assert all(g is None or not g.any() for g in rest)
    total.backward()
    for module in (agent.actor, agent.critic):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert agent.log_alpha.grad is not None and agent.log_alpha_prime.grad is not None
    assert all(p.grad is None for p in agent.target_critic.parameters())


def test_behaviour_cloning_warm_start_raises_data_likelihood():
    agent, args = small_agent()
    batch = random_batch()
    opt = torch.optim.Adam(agent.actor.parameters(), lr=3e-3)
    before = agent.actor.log_prob(batch["obs"], batch["actions"]).mean().item()
    for _ in range(100):
        opt.zero_grad()
        cql.compute_losses(agent, batch, args, bc=True)[1]["actor_loss"].backward()
        opt.step()
    assert agent.actor.log_prob(batch["obs"], batch["actions"]).mean().item() > before + 0.4


# ---------------------------------------------------------------- rlkit's actor, init, max backup
# CQL code (github.com/aviralkumar2907/CQL @ d67dbe9): d4rl/rlkit/torch/sac/policies.py
# LOG_SIG_MAX = 2, LOG_SIG_MIN = -5, MEAN_MIN/MAX = -9/9 (used in log_prob only, L81),
# init_w=1e-3 (L45, L61-63); networks.py init_w=3e-3 (L27), fanin_init hidden layers with
# b_init_value=0.1 (L30-31, L49-54); pytorch_util.py fanin_init bound 1/sqrt(size[0]);
# cql.py L219-224: max backup = per critic the max over 10 sampled actions, then the min.


def test_rlkit_actor_clamps_log_std_always_and_the_mean_in_log_prob_only():
    args = cql.Args()
    assert (args.log_std_min, args.log_std_max, args.mean_clamp) == (-5.0, 2.0, 9.0)
    assert "policies.py" in cql.DEFAULT_SOURCES["log_std_min"]
    actor = cql.TanhGaussianActor(3, 1, (4,), "rlkit", log_std_range=(-5.0, 2.0),
                                  mean_clamp=9.0)
    last = actor.net[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([20.0, -10.0]))  # mean 20, log-std -10
    obs = torch.zeros(1, 3)
    mean, log_std = actor.dist(obs)
    assert mean.item() == 20.0 and log_std.item() == -5.0  # std exp(-5) in forward
    assert actor.act_deterministic(obs).item() == pytest.approx(math.tanh(20.0))
    a = torch.tensor([[0.5]])
    u = torch.atanh(a)
    want = Normal(torch.tensor(9.0), math.exp(-5.0)).log_prob(u) - torch.log1p(-a**2)
    torch.testing.assert_close(actor.log_prob(obs, a), want.sum(-1), rtol=1e-4, atol=1e-3)


def test_rlkit_init_bounds():
    torch.manual_seed(0)
    critic = cql.FusedCritic(3, 4, (7, 50), "rlkit")
    hidden, last = critic.layers[0], critic.layers[-1]
    bound = 1 / math.sqrt(7)  # rlkit fan_in = size[0] of the [out, in] weight: out_features
    assert 0.9 * bound < hidden.weight.abs().max() <= bound
    assert torch.all(hidden.bias == 0.1) and torch.all(critic.layers[1].bias == 0.1)
    for t in (last.weight, last.bias):
        assert 0.5 * 3e-3 < t.abs().max() <= 3e-3  # Q networks: init_w 3e-3
    actor = cql.TanhGaussianActor(3, 2, (7, 50), "rlkit")
    linears = [m for m in actor.net if isinstance(m, torch.nn.Linear)]
    assert 0.9 / math.sqrt(7) < linears[0].weight.abs().max() <= 1 / math.sqrt(7)
    assert torch.all(linears[0].bias == 0.1)
    for t in (linears[-1].weight, linears[-1].bias):
        assert 0.5e-3 < t.abs().max() <= 1e-3  # policy heads: init_w 1e-3
    assert cql.Args().init == "rlkit" and cql.preset_args("antmaze-umaze").init == "orthogonal"


class TwoActionCritic(torch.nn.Module):
    """Q1(a) = [0, 10], Q2(a) = [10, 0] over the two sampled actions (a = -1, +1)."""

    def forward(self, obs, action, detach=False):
        a = action[..., 0]
        return torch.stack([5 + 5 * a, 5 - 5 * a])


class TwoActionActor(torch.nn.Module):
    def forward(self, obs):
        shape = obs.shape[:-1]
        a = torch.tensor([-1.0, 1.0]).expand(*shape).reshape(*shape, 1)
        return a, torch.zeros(shape)


@pytest.mark.parametrize("form, value", [("cql", 10.0), ("calql", 0.0)])
def test_the_two_max_backup_forms(form, value):
    agent = torch.nn.Module()
    agent.actor, agent.target_critic = TwoActionActor(), TwoActionCritic()
    args = make_args(max_backup=True, max_backup_form=form, cql_n_actions=2, gamma=1.0)
    batch = dict(next_obs=torch.zeros(1, 3), rewards=torch.zeros(1), dones=torch.zeros(1))
    target = cql.bellman_target(agent, batch, args, torch.tensor(1.0))
    assert target.item() == value  # rlkit: min(max Q1, max Q2); Cal-QL: max(min(Q1, Q2))
    assert cql.Args().max_backup_form == "cql"
    assert cql.preset_args("antmaze-umaze").max_backup_form == "calql"
    assert cql.preset_args("kitchen-mixed").max_backup_form == "cql"


def test_rlkit_max_backup_has_no_entropy_term():
    with pytest.raises(SystemExit, match="--max-backup-form calql"):
        cql.parse_args(["--max-backup", "--backup-entropy"])
    assert cql.parse_args(["--max-backup", "--backup-entropy", "--max-backup-form",
                           "calql"]).backup_entropy


def test_total_steps_source_states_paper_and_official_lengths():
    src = cql.DEFAULT_SOURCES["total_steps"]
    assert "1M" in src and "3000" in src and "1000" in src and "3M" in src
