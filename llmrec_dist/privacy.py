"""User-level differentially private training: DP-SGD with Opacus's clipping, noise and accountant.

The guarantee (``privacy.epsilon`` = ε, ``privacy.delta`` = δ): *whether or not any one person's whole
interaction history was used to train the model changes the probability of any outcome of training (the
model, its checkpoints and the metrics logged per step) by at most a factor e^ε, except with probability δ.*

How each part of DP-SGD is met here:

- **The unit is the user.** A training row is one user's history and the recipe trains on one window of
  it (the latest ``model.max_len`` + 1 items; ``data.windows`` is refused), so one user is one example.
  Each user's gradient is computed on that user alone (a forward and backward pass per user), so it
  depends on nobody else's data — in-batch negatives, the batch's items that a trainable LM runs on and
  the sampled softmax's candidates all come from the one user. Settings that read every user's data
  (``train.negatives_from=trained``, ``model.id_min_count``) are refused by the config.
- **Clipping and noise**: Opacus's :class:`~opacus.optimizers.DPOptimizer` clips each user's gradient to
  ``privacy.max_grad_norm`` (C), adds up a step's clipped gradients, adds Gaussian noise of std σ·C
  once per global step (with several workers on rank 0 only: ``DistributedDPOptimizer``; the noisy sums
  are then all-reduced) and divides by the expected batch size. The noise comes from a generator seeded
  from the operating system's entropy, not from ``train.seed``: anyone holding the config could
  otherwise regenerate and subtract it.
- **Sampling**: Poisson sampling, for which the accountant's amplification holds: at every step each user
  is in the batch independently with probability q = ``train.batch_size`` / users (the batch size varies;
  ``train.batch_size`` is its expectation), for ⌈1/q⌉ steps per epoch. Users are split over the workers by
  a keyed hash of their ``user_key``, so a user's worker does not depend on who else is in the data.
- **Accounting**: Opacus's PRV (default) or RDP accountant over the steps actually taken; ε spent is
  logged per epoch (``privacy_epsilon``). With a target ε the noise multiplier is calibrated for all of
  ``train.epochs`` before Ray starts (early stopping only spends less).

Not covered (documented in docs/privacy.md): the validation metrics used for early stopping and model
selection, the item popularity counts (the registered package of a private run carries none), and the
text features (the item catalogue is public data).
"""

from __future__ import annotations

import hashlib
import math
import secrets
from dataclasses import asdict, dataclass

import numpy as np
import torch

from llmrec_dist.config import Config

HOLDOUT_SALT = b"llmrec_dist holdout v1\n"
SHARD_SALT = b"llmrec_dist dp shard v1\n"


class PrivacyError(ValueError):
    """A privacy setting that cannot be met for this dataset (its message names the key)."""


@dataclass(frozen=True)
class PrivacyPlan:
    """The DP-SGD schedule of one run, fixed on the driver before Ray starts."""

    users: int                # training users (the privacy units)
    sample_rate: float        # q: each user's probability of being in a step's batch
    steps_per_epoch: int
    epochs: int
    noise_multiplier: float   # sigma: noise std / max_grad_norm
    max_grad_norm: float
    delta: float
    accountant: str
    target_epsilon: float | None
    planned_epsilon: float    # epsilon after every planned step

    def to_dict(self) -> dict:
        return asdict(self)

    def sentence(self) -> str:
        """The guarantee, in one sentence a data-protection officer can read."""
        return (f"Whether or not any one person's whole interaction history was used to train this model "
                f"changes the probability of any training outcome by at most a factor of "
                f"e^{self.planned_epsilon:.2f} = {math.exp(self.planned_epsilon):.1f}, except with probability "
                f"{self.delta:.1e} ((epsilon, delta)-differential privacy at the user level, "
                f"epsilon = {self.planned_epsilon:.2f}, delta = {self.delta:.1e}).")


def unit_hash(key: str, salt: bytes) -> float:
    """A user's place in [0, 1), fixed by its key and ``salt`` alone (not by the other users)."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8, key=salt[:64]).digest()
    return int.from_bytes(digest, "big") / 2**64


def held_out(keys, fraction: float) -> np.ndarray:
    """Flags: the users ``data.holdout_users`` leaves out of training (the audit's non-members)."""
    if fraction <= 0:
        return np.zeros(len(keys), dtype=bool)
    return np.array([unit_hash(k, HOLDOUT_SALT) < fraction for k in keys], dtype=bool)


def shard_of(keys, world: int) -> np.ndarray:
    """The worker of every user under DP: a keyed hash of its key, so no user's worker depends on others."""
    return np.array([int(unit_hash(k, SHARD_SALT) * world) for k in keys], dtype=np.int64)


def _accountant(name: str):
    from opacus.accountants import create_accountant

    return create_accountant(mechanism=name)


def epsilon_after(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    """Epsilon spent after ``steps`` Poisson-sampled steps (Opacus's accountant)."""
    if steps <= 0:
        return 0.0
    acc = _accountant(accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    return float(acc.get_epsilon(delta=delta))


def plan(cfg: Config, users: int) -> PrivacyPlan:
    """The run's DP-SGD schedule for ``users`` training users; :class:`PrivacyError` (naming the key) when
    the target cannot be met."""
    p = cfg.privacy
    if users < 2:
        raise PrivacyError(f"privacy.epsilon: differential privacy needs training users; the split has {users}")
    if cfg.train.batch_size >= users:
        raise PrivacyError(f"train.batch_size: with privacy it is the expected Poisson batch and must be below the "
                           f"number of training users ({users}); got {cfg.train.batch_size}")
    delta = p.delta if p.delta is not None else 1.0 / users
    rate = cfg.train.batch_size / users
    per_epoch = math.ceil(1 / rate)
    epochs = cfg.epochs_to_run()
    steps = per_epoch * epochs
    if p.noise_multiplier is not None:
        sigma = p.noise_multiplier
    else:
        from opacus.accountants.utils import get_noise_multiplier

        try:
            sigma = get_noise_multiplier(target_epsilon=p.epsilon, target_delta=delta, sample_rate=rate,
                                         steps=steps, accountant=p.accountant, epsilon_tolerance=0.01)
        except ValueError as err:
            raise PrivacyError(
                f"privacy.epsilon: {p.epsilon} cannot be reached in {epochs} epochs of {per_epoch} steps at "
                f"sampling rate {rate:.4g} (delta {delta:.2g}) by any noise level ({err}); raise privacy.epsilon, "
                "or lower train.epochs or train.batch_size") from None
    planned = epsilon_after(sigma, rate, steps, delta, p.accountant)
    if not math.isfinite(planned):
        raise PrivacyError(f"privacy.noise_multiplier: {sigma} gives an unbounded epsilon over {steps} steps; "
                           "raise it")
    return PrivacyPlan(users, rate, per_epoch, epochs, float(sigma), p.max_grad_norm, float(delta), p.accountant,
                       p.epsilon, planned)


def poisson_batches(num_rows: int, rate: float, steps: int, rng: np.random.Generator):
    """Row indices of each of ``steps`` batches: every row independently with probability ``rate``."""
    for _ in range(steps):
        yield np.flatnonzero(rng.random(num_rows) < rate)


def secret_seed() -> int:
    """A seed from the operating system's entropy (the noise and the sampling must not be reproducible
    from the config)."""
    return secrets.randbits(63)


class PrivateStep:
    """One DP-SGD optimiser step over a batch of users: per-user gradients (one forward and backward per
    user, in chunks of ``privacy.user_chunk``), handed to Opacus as ``grad_sample`` to clip, add up, noise
    and scale; the accountant counts the step."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, plan_: PrivacyPlan,
                 world: int, user_chunk: int):
        from opacus.optimizers import DistributedDPOptimizer, DPOptimizer

        self.model, self.plan, self.user_chunk = model, plan_, user_chunk
        self.params = [p for p in model.parameters() if p.requires_grad]
        generator = torch.Generator(device=self.params[0].device)
        generator.manual_seed(secret_seed())
        kind = DistributedDPOptimizer if world > 1 else DPOptimizer
        # expected_batch_size is per worker: the distributed optimiser also divides by the world size
        self.optimizer = kind(optimizer, noise_multiplier=plan_.noise_multiplier, max_grad_norm=plan_.max_grad_norm,
                              expected_batch_size=max(1, round(plan_.sample_rate * plan_.users / world)),
                              loss_reduction="mean", generator=generator)
        self.accountant = _accountant(plan_.accountant)
        self.optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=plan_.sample_rate))

    def epsilon(self) -> float:
        return float(self.accountant.get_epsilon(delta=self.plan.delta)) if self.accountant.history else 0.0

    def step(self, examples, loss_of) -> tuple[float, float]:
        """One global step over this worker's ``examples`` (one per user; may be empty): ``loss_of(example)``
        gives the user's loss and its target count. Returns (summed loss x positions, positions)."""
        loss_sum = positions = 0.0
        chunks = [examples[i:i + self.user_chunk] for i in range(0, len(examples), self.user_chunk)] or [[]]
        for n, chunk in enumerate(chunks):
            per_user = [torch.zeros((len(chunk), *p.shape), dtype=p.dtype, device=p.device) for p in self.params]
            for row, example in enumerate(chunk):
                loss, count = loss_of(example)
                if count == 0:  # nothing to predict: a zero gradient (it still counts as sampled)
                    continue
                grads = torch.autograd.grad(loss, self.params, allow_unused=True)
                for target, grad in zip(per_user, grads):
                    if grad is not None:
                        target[row] = grad
                loss_sum += loss.item() * count
                positions += count
            for p, grad_sample in zip(self.params, per_user):
                p.grad_sample = grad_sample
            if n < len(chunks) - 1:  # clip and add up this chunk; noise once, at the last one
                self.optimizer.signal_skip_step(do_skip=True)
            self.optimizer.step()
            if n < len(chunks) - 1:
                for p in self.params:
                    p.grad_sample = None
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum, positions
