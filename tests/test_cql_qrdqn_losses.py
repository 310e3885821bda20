"""cql_qrdqn_atari.py: the QR-DQN loss, the QR target and the CQL(H) term against brute force."""

import dataclasses
import math

import pytest
import torch

import cql_qrdqn_atari as m


def brute_quantile_huber(pred, target, kappa):
    """Dabney et al. Eq. 9-10 with explicit loops, official reduction (sum_i mean_j)."""
    B, N = pred.shape
    Np = target.shape[1]
    out = torch.zeros(B, dtype=torch.float64)
    for b in range(B):
        total = 0.0
        for i in range(N):
            tau = (i + 0.5) / N
            acc = 0.0
            for j in range(Np):
                u = float(target[b, j]) - float(pred[b, i])
                huber = 0.5 * u * u if abs(u) <= kappa else kappa * (abs(u) - 0.5 * kappa)
                acc += abs(tau - (1.0 if u < 0 else 0.0)) * huber
            total += acc / Np
        out[b] = total
    return out


@pytest.mark.parametrize("kappa", [1.0, 0.5])
def test_quantile_huber_loss_matches_brute_force(kappa):
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 7, generator=g, dtype=torch.float64) * 2
    target = torch.randn(3, 5, generator=g, dtype=torch.float64) * 2
    got = m.quantile_huber_loss(pred, target, kappa)
    want = brute_quantile_huber(pred, target, kappa)
    torch.testing.assert_close(got, want)


def test_quantile_huber_gradient_moves_quantiles_to_target_quantiles():
    """Minimising the loss puts quantile i at the tau_hat_i quantile of the target samples."""
    torch.manual_seed(0)
    samples = torch.randn(1, 2001, dtype=torch.float64).sort(dim=1).values
    pred = torch.zeros(1, 4, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([pred], lr=0.05)
    for _ in range(1500):
        opt.zero_grad()
        m.quantile_huber_loss(pred, samples, kappa=1e-3).sum().backward()
        opt.step()
    tau_hat = torch.tensor([0.125, 0.375, 0.625, 0.875], dtype=torch.float64)
    want = samples[0, (tau_hat * 2000).round().long()]
    torch.testing.assert_close(pred.detach()[0], want, atol=0.05, rtol=0)


def test_qr_target_uses_greedy_mean_action_of_target_net():
    g = torch.Generator().manual_seed(1)
    B, A, N = 4, 3, 6
    nxt = torch.randn(B, A, N, generator=g)
    rewards = torch.tensor([1.0, -1.0, 0.5, 0.0])
    dones = torch.tensor([0.0, 1.0, 0.0, 0.0])
    gamma = 0.9
    got = m.qr_target(nxt, rewards, dones, gamma)
    for b in range(B):
        means = [float(nxt[b, a].mean()) for a in range(A)]
        a_star = max(range(A), key=lambda a: means[a])
        want = rewards[b] + gamma * (1 - dones[b]) * nxt[b, a_star]
        torch.testing.assert_close(got[b], want)
    # the greedy action is by the MEAN: a distribution with a larger max but smaller mean loses
    nxt2 = torch.zeros(1, 2, 4)
    nxt2[0, 0] = torch.tensor([-3.0, -3.0, -3.0, 10.0])  # mean 0.25, max 10
    nxt2[0, 1] = torch.tensor([1.0, 1.0, 1.0, 1.0])  # mean 1
    t = m.qr_target(nxt2, torch.zeros(1), torch.zeros(1), 1.0)
    torch.testing.assert_close(t[0], nxt2[0, 1])


def test_cql_gap_value_matches_brute_force():
    q = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 5.0]], dtype=torch.float64)
    actions = torch.tensor([2, 0])
    want = sum(math.log(sum(math.exp(v) for v in row)) for row in q.tolist()) / 2
    want -= (3.0 + 0.0) / 2
    assert m.cql_gap(q, actions).item() == pytest.approx(want, rel=1e-12)
    assert m.cql_gap(q, actions).item() >= 0.0  # logsumexp >= any single Q


def test_cql_gap_gradient_lowers_non_data_actions_and_raises_data_action():
    q = torch.tensor([[0.5, 2.0, -1.0, 0.0]], requires_grad=True)
    actions = torch.tensor([1])
    m.cql_gap(q, actions).backward()
    grad = q.grad[0]
    # gradient descent step = -grad: the data action (1) goes up, every other action goes down
    assert grad[1] < 0
    assert (grad[[0, 2, 3]] > 0).all()
    # exact: d/dQ = softmax(Q) - onehot(a)
    torch.testing.assert_close(grad, torch.softmax(q.detach()[0], 0) - torch.eye(4)[1])


def test_cql_term_on_quantile_network_lowers_ood_q_in_training():
    """A few steps of the full update with only CQL (huge alpha): the data action's Q ends
    above the other actions' Q at the data states."""
    torch.manual_seed(0)
    args = dataclasses.replace(m.preset_args("cartpole-expert"), cql_weight=100.0, qf_lr=1e-2,
                               hidden_dims=(16,), num_quantiles=5)
    agent = m.Agent((4,), 3, args)
    trainer = m.Trainer(agent, args, torch.device("cpu"))
    obs = torch.randn(32, 4)
    actions = torch.zeros(32, dtype=torch.long)  # the data always takes action 0
    batch = dict(obs=obs, actions=actions, rewards=torch.zeros(32), next_obs=obs,
                 dones=torch.ones(32))
    q0 = agent.q(obs).mean(2).detach()
    for _ in range(30):
        trainer.step(batch)
    q1 = agent.q(obs).mean(2).detach()
    assert (q1[:, 0] - q0[:, 0]).mean() > 0  # data action raised
    assert ((q1[:, 1:] - q0[:, 1:]).mean(0) < 0).all()  # the others lowered
    assert (q1[:, 0] > q1[:, 1:].max(1).values).all()


def test_lagrange_alpha_grows_when_gap_exceeds_target():
    args = dataclasses.replace(m.preset_args("cartpole-expert"), lagrange=True,
                               cql_tau=0.0, alpha_prime_lr=0.1, hidden_dims=(8,),
                               num_quantiles=3)
    agent = m.Agent((4,), 4, args)
    trainer = m.Trainer(agent, args, torch.device("cpu"))
    batch = tiny_batch(16, 4)

    def alpha_prime():
        return agent.log_alpha_prime.exp().item()

    before = alpha_prime()
    trainer.step(batch)
    assert alpha_prime() > before  # gap > 0 = tau: alpha' grows
    args.cql_tau = 100.0
    before = alpha_prime()
    trainer.step(batch)
    assert alpha_prime() < before  # gap < tau: alpha' shrinks


def tiny_batch(n: int, obs_dim: int) -> dict[str, torch.Tensor]:
    obs = torch.randn(n, obs_dim)
    return dict(obs=obs, actions=torch.zeros(n, dtype=torch.long), rewards=torch.zeros(n),
                next_obs=obs, dones=torch.ones(n))


def test_each_loss_trains_only_its_parameters():
    """compute_losses' map: the QR and CQL losses train only the Q network, the alpha' loss
    only log alpha'; the target network gets no gradient from any of them."""
    args = dataclasses.replace(m.preset_args("cartpole-expert"), lagrange=True,
                               hidden_dims=(8,), num_quantiles=3)
    agent = m.Agent((4,), 3, args)
    _, metrics = m.compute_losses(agent, tiny_batch(8, 4), args)
    assert all(not v.requires_grad for v in metrics.values())

    def grads(name: str) -> dict[str, bool]:
        agent.zero_grad(set_to_none=True)
        obs = torch.randn(8, 4)
        batch = dict(tiny_batch(8, 4), obs=obs, next_obs=obs + 1)
        total, _ = m.compute_losses(agent, batch, args)
        q = agent.q(obs).mean(2)
        gap = m.cql_gap(q, batch["actions"])
        terms = dict(zip(("cql", "alpha_prime"), m.lagrange_terms(
            gap, agent.log_alpha_prime, args.cql_weight, args.cql_tau)[:2], strict=True))
        (total if name == "total" else terms[name]).backward()
        return {n: p.grad is not None and bool(p.grad.abs().sum() > 0)
                for n, p in agent.named_parameters()}

    cql, alpha = grads("cql"), grads("alpha_prime")
    assert cql["q.head.weight"] and not cql["log_alpha_prime"]
    assert alpha.pop("log_alpha_prime") and not any(alpha.values())
    total = grads("total")
    assert total["q.head.weight"] and total["log_alpha_prime"]
    assert not any(v for n, v in total.items() if n.startswith("target_q."))
    assert all(not p.requires_grad for p in agent.target_q.parameters())


@pytest.mark.parametrize(("padding", "flat"), [("same", 64 * 11 * 11), ("valid", 64 * 7 * 7)])
def test_nature_torso_shapes(padding, flat):
    net = m.QRNetwork((4, 84, 84), 6, 200, (), padding)
    linears = [mod for mod in net.torso if isinstance(mod, torch.nn.Linear)]
    assert linears[0].in_features == flat and linears[0].out_features == 512
    convs = [mod for mod in net.torso if isinstance(mod, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (32, (8, 8), (4, 4)), (64, (4, 4), (2, 2)), (64, (3, 3), (1, 1))]
    out = net(torch.randint(0, 256, (2, 4, 84, 84), dtype=torch.uint8))
    assert out.shape == (2, 6, 200)


def test_tf_same_padding_matches_tensorflow_rule():
    # 84 -(8,4)-> 21 (pad 2+2), 21 -(4,2)-> 11 (pad 1+2), 11 -(3,1)-> 11 (pad 1+1)
    assert m._tf_same_pad(84, 8, 4) == (2, 2, 21)
    assert m._tf_same_pad(21, 4, 2) == (1, 2, 11)
    assert m._tf_same_pad(11, 3, 1) == (1, 1, 11)


def test_mlp_torso_for_vector_obs_and_uint8_scaling():
    net = m.QRNetwork((4,), 2, 7, (16, 16))
    assert not net.frames and net(torch.zeros(3, 4)).shape == (3, 2, 7)
    conv = m.QRNetwork((4, 84, 84), 2, 3, ())
    x = torch.full((1, 4, 84, 84), 255, dtype=torch.uint8)
    torch.testing.assert_close(conv(x), conv(torch.ones(1, 4, 84, 84) * 255).view(1, 2, 3))
    # inputs are divided by 255: a float 1.0 image equals the uint8 255 image
    assert torch.allclose(conv(x), conv.head(conv.torso(torch.ones(1, 4, 84, 84))).view(1, 2, 3))
