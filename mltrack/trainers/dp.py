"""The ``dp`` trainer: DP-SGD with Opacus (Poisson sampling, per-sample clipping, Gaussian noise, an accountant).

What the trainer does, in order, and why:

1. Refuses what would be mis-accounted, before anything is built. In ``__init__``: gradient accumulation
   (Opacus forbids accumulating per-sample gradients under Poisson sampling; virtual steps exist only
   through its BatchMemoryManager, which splits one Poisson batch, not several - raise
   ``training.batch_size`` instead: it is the *expected* Poisson batch size) and class weights (a weighted
   mean makes each sample's gradient depend on the others'). In ``prepare``: a train sampler other than
   plain shuffle/sequential (Opacus replaces it with Poisson sampling, so a balanced sampler would be
   silently dropped) and ``target_delta >= 1/N`` (N = training samples).
2. Replaces layers DP cannot handle (BatchNorm mixes samples) with ``ModuleValidator.fix`` (GroupNorm),
   logs every replacement and rebuilds the optimizer over the new parameters (same class, same groups and
   hyper-parameters, matched by parameter name). Remaining validator errors (e.g. a model in eval mode)
   become a ConfigError that lists them.
3. Chooses ``grad_sample_mode``: the configured one, except "auto" (or the default left unset), which
   means "ew" for torchvision models and "hooks" otherwise - Opacus' "hooks" fails on torchvision
   ResNet/MobileNet after the fix (in-place adds/ReLUs on hooked outputs), "ew" trains them; our
   ``small_cnn`` works in both. That failure happens in the forward pass, which ``autocast()`` wraps, so it
   becomes a ConfigError naming the fix instead of a traceback.
4. ``make_private`` with Poisson sampling. With ``target_epsilon`` the noise multiplier is solved for the
   exact number of optimizer steps the loop will take (``num_epochs * len(poisson loader)``) with the
   configured accountant - what ``make_private_with_epsilon`` does, except that it counts steps as
   ``int(epochs / sample_rate)``, which is one short for some loader lengths (e.g. 3 epochs of 75
   batches -> 224), and one unaccounted step can push the final epsilon over the target.

Empty Poisson batches: the loop skips their forward pass (``is_empty_batch``); ``optimizer_step`` still
takes the DP step (zero clipped sum + noise, counted by the accountant), as Opacus does for empty batches,
so whether a draw was empty is not revealed by a missing update.

``training.max_grad_norm`` keeps its meaning in every trainer (global-norm clipping of the gradient the
optimizer applies); here it clips the privatised (clipped + noised) gradient, which is post-processing
and costs no privacy. Per-sample clipping is ``training.dp.max_grad_norm``.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from mltrack.config import TrainingConfig
from mltrack.console import get_logger
from mltrack.errors import CheckpointError, ConfigError
from mltrack.trainers.base import Trainer

_ROOT_HANDLERS = list(logging.getLogger().handlers)
from opacus import PrivacyEngine  # noqa: E402
from opacus.accountants.utils import get_noise_multiplier  # noqa: E402
from opacus.validators import ModuleValidator  # noqa: E402

# Importing opacus runs logging.basicConfig(), giving the root logger a handler with its own format, so every
# mltrack log line would print twice. Remove exactly the handlers that import added.
for _handler in [h for h in logging.getLogger().handlers if h not in _ROOT_HANDLERS]:
    logging.getLogger().removeHandler(_handler)

log = get_logger()
# Opacus' backward hooks make torch warn on the first layer (its input needs no gradient); harmless here.
_HOOK_WARNING = "Full backward hook is firing when gradients are computed with respect"
# PRV's error bounds are computed through RDP orders; at small epsilons it asks for more orders. Not actionable.
_ALPHA_WARNING = "Optimal order is the largest alpha"


def fix_model(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """``model`` with DP-incompatible layers replaced (a copy when anything changed) and the list of
    replacements as ``"<module name>: <old type> -> <new type>"``; the model itself when nothing changed.

    Also what a DP-trained checkpoint needs before it can be loaded into a freshly built model.
    """
    if not ModuleValidator.validate(model, strict=False):
        return model, []
    before = {name: type(m).__name__ for name, m in model.named_modules()}
    fixed = ModuleValidator.fix(model)
    after = {name: type(m).__name__ for name, m in fixed.named_modules()}
    replaced = [f"{name}: {before[name]} -> {after[name]}" for name in after
                if name in before and before[name] != after[name]]
    return (fixed, replaced) if replaced else (model, [])


def rebuild_optimizer(optimizer: torch.optim.Optimizer, old: nn.Module, new: nn.Module) -> torch.optim.Optimizer:
    """The same optimizer class, param groups and hyper-parameters over ``new``'s parameters (matched by name).

    Needed because ``ModuleValidator.fix`` creates new parameters for the replaced layers, and Opacus
    refuses an optimizer whose parameters are not the model's. Only called before any step (no state).
    """
    names = {id(p): name for name, p in old.named_parameters()}
    params = dict(new.named_parameters())
    groups = []
    for group in optimizer.param_groups:
        try:
            members = [params[names[id(p)]] for p in group["params"]]
        except KeyError as err:
            raise ConfigError(f"the dp layer fix renamed parameter {err}; the optimizer cannot be moved to the "
                              "fixed model - use an architecture without BatchNorm") from None
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": members})
    accepted = inspect.signature(type(optimizer).__init__).parameters
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    return type(optimizer)(groups, **defaults)


def _summary(replaced: list[str], shown: int = 8) -> str:
    """``"6 replaced (BatchNorm2d -> GroupNorm): features.0.1, …"``: short enough for an MLflow param."""
    if not replaced:
        return "none"
    kinds = sorted({r.split(": ", 1)[1] for r in replaced})
    names = [r.split(": ", 1)[0] for r in replaced]
    more = f", … ({len(names) - shown} more)" if len(names) > shown else ""
    return f"{len(names)} replaced ({'; '.join(kinds)}): {', '.join(names[:shown])}{more}"


def _check_sampler(loader: DataLoader) -> None:
    sampler, batches = loader.sampler, loader.batch_sampler
    if not isinstance(sampler, (RandomSampler, SequentialSampler)) or type(batches) is not BatchSampler:
        used = type(sampler).__name__ if not isinstance(sampler, (RandomSampler, SequentialSampler)) \
            else type(batches).__name__
        raise ConfigError(
            f"trainer_type dp draws its own Poisson-sampled batches, but the train loader uses {used} "
            "(e.g. data.sampler: balanced); it would be silently replaced and the privacy accounting would not "
            "describe your sampling. Set data.sampler: shuffle for dp training"
        )


def _check_delta(delta: float, n: int) -> None:
    if delta >= 1.0 / n:
        raise ConfigError(
            f"training.dp.target_delta {delta:g} must be < 1/N = {1.0 / n:.3g} for N = {n} training samples "
            f"(a delta of 1/N or more allows leaking a whole record); use e.g. target_delta: {1.0 / (10 * n):.1e}"
        )


class DPTrainer(Trainer):
    name = "dp"

    def __init__(self, cfg: TrainingConfig, device: torch.device) -> None:
        super().__init__(cfg, device)
        self.dp = cfg.dp_or_default
        if cfg.gradient_accumulation_steps > 1:
            raise ConfigError(
                "training.gradient_accumulation_steps > 1 cannot be used with trainer_type dp: Opacus accounts each "
                "Poisson batch as one step and forbids accumulating per-sample gradients across batches. Raise "
                "training.batch_size instead (it is the expected Poisson batch size)"
            )
        if cfg.class_weights != "none":
            raise ConfigError(
                "training.class_weights cannot be used with trainer_type dp: the weighted mean loss divides by the "
                "batch's total weight, so one sample's presence rescales every other sample's gradient and the "
                "per-sample sensitivity that the privacy accounting assumes no longer holds. Use class_weights: none"
            )
        try:
            with warnings.catch_warnings():
                # Opacus warns on every engine that secure_mode is off; we log dp.secure_mode as a param instead.
                warnings.filterwarnings("ignore", message="Secure RNG turned off")
                self.engine = PrivacyEngine(accountant=self.dp.accountant, secure_mode=self.dp.secure_mode)
        except ImportError as err:
            raise ConfigError(f"training.dp.secure_mode: true needs torchcsprng ({err}); install it or set "
                              "secure_mode: false") from None
        self.optimizer: Any = None  # the DPOptimizer, after prepare
        self.replaced: list[str] = []
        self.grad_sample_mode = self.dp.grad_sample_mode
        self.noise_multiplier = self.dp.noise_multiplier
        self.sample_rate = 0.0
        self.expected_batch_size = 0
        self.planned_steps = 0

    # -- set-up ------------------------------------------------------------------------------
    def prepare(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, loaders: dict[str, DataLoader | None]
    ) -> tuple[nn.Module, torch.optim.Optimizer, dict[str, DataLoader | None]]:
        """Validate, fix and privatise; returns Opacus' model, optimizer and Poisson train loader (module doc)."""
        train = loaders["train"]
        assert train is not None
        _check_sampler(train)
        _check_delta(self.dp.target_delta, len(train.dataset))  # type: ignore[arg-type]
        fixed, self.replaced = fix_model(model)
        if self.replaced:
            log.info("dp: replaced %d DP-incompatible layers: %s", len(self.replaced), "; ".join(self.replaced))
            optimizer = rebuild_optimizer(optimizer, model, fixed)
        errors = ModuleValidator.validate(fixed, strict=False)
        if errors:
            raise ConfigError("the model cannot be trained with differential privacy: "
                              + "; ".join(str(e) for e in errors))
        fixed = fixed.to(self.device)  # in place for parameters: the optimizer keeps pointing at them
        if self.cfg.channels_last:
            fixed = fixed.to(memory_format=torch.channels_last)
        self.grad_sample_mode = self._choose_mode(model)
        try:
            dp_model, dp_opt, dp_train = self.engine.make_private(
                module=fixed, optimizer=optimizer, data_loader=train, noise_multiplier=self.dp.noise_multiplier,
                max_grad_norm=self.dp.max_grad_norm, poisson_sampling=True, grad_sample_mode=self.grad_sample_mode)
        except (NotImplementedError, ValueError) as err:
            raise ConfigError(f"Opacus cannot privatise this model with grad_sample_mode "
                              f"'{self.grad_sample_mode}': {err}. Try training.dp.grad_sample_mode: ew") from None
        self.optimizer = dp_opt
        self.sample_rate = float(dp_train.sample_rate)
        self.expected_batch_size = int(dp_opt.expected_batch_size)
        self.planned_steps = self.cfg.num_epochs * len(dp_train)
        if self.dp.target_epsilon is not None:
            dp_opt.noise_multiplier = self._solve_noise()
        self.noise_multiplier = float(dp_opt.noise_multiplier)
        return dp_model, dp_opt, {**loaders, "train": dp_train}

    def _choose_mode(self, model: nn.Module) -> str:
        """"ew" for torchvision models when the mode is "auto" or was left at its default, else the configured one.

        (A config that went through ``config.replace`` reports every field as set, so only an "auto" value
        survives that round trip; the default check covers configs straight from ``load_config``.)
        """
        mode = self.dp.grad_sample_mode
        if mode == "auto" or "grad_sample_mode" not in self.dp.model_fields_set:
            if type(model).__module__.startswith("torchvision."):
                log.info("dp: grad_sample_mode 'ew' for torchvision model %s (Opacus 'hooks' fails on its in-place "
                         "ops); set training.dp.grad_sample_mode to override", type(model).__name__)
                return "ew"
            return "hooks"
        return mode

    def _solve_noise(self) -> float:
        assert self.dp.target_epsilon is not None
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_ALPHA_WARNING)
                sigma = get_noise_multiplier(target_epsilon=self.dp.target_epsilon,
                                             target_delta=self.dp.target_delta, sample_rate=self.sample_rate,
                                             steps=self.planned_steps, accountant=self.dp.accountant)
        except ValueError as err:
            raise ConfigError(f"training.dp.target_epsilon {self.dp.target_epsilon:g} cannot be reached in "
                              f"{self.planned_steps} steps ({err}); raise target_epsilon or lower num_epochs"
                              ) from None
        log.info("dp: noise multiplier %.4f reaches epsilon <= %g at delta %g after %d steps", sigma,
                 self.dp.target_epsilon, self.dp.target_delta, self.planned_steps)
        return float(sigma)

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The plain module inside Opacus' GradSampleModule, so checkpoints hold ordinary state-dict keys."""
        return getattr(model, "_module", model)

    # -- per batch ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """fp32 (no autocast); wraps the forward pass, so Opacus' in-place failure becomes a clear ConfigError."""
        try:
            yield
        except RuntimeError as err:
            if "BackwardHookFunction" not in str(err):
                raise
            # grad_sample_mode "hooks" vs in-place ops on hooked outputs (e.g. torchvision ResNet/MobileNet blocks).
            raise ConfigError(f"Opacus grad_sample_mode '{self.grad_sample_mode}' cannot handle this model's "
                              f"in-place operations ({str(err).split('.')[0]}); set training.dp.grad_sample_mode: "
                              "ew") from None

    def backward(self, loss: torch.Tensor) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_HOOK_WARNING)
            loss.backward()

    def skips_on_device(self, optimizer: torch.optim.Optimizer) -> bool:
        return False  # the step is Opacus' pre_step (clip, noise, account) plus the plain optimizer

    def optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                       found_inf: torch.Tensor | None = None) -> bool:
        assert found_inf is None, "dp steps are guarded on the host (skips_on_device is False)"
        params = optimizer.params  # type: ignore[attr-defined]  # DPOptimizer: the trainable parameters
        if all(getattr(p, "grad_sample", None) is None for p in params):
            # The loop skipped an empty Poisson batch: take the step anyway (module docstring).
            for p in params:
                p.grad_sample = p.new_zeros((0, *p.shape))
        if optimizer.pre_step():  # type: ignore[attr-defined]  # clip per sample, add noise, account
            self.clip_gradients(model)
            optimizer.original_optimizer.step()  # type: ignore[attr-defined]
        return True

    # -- per epoch / resume ------------------------------------------------------------------
    def steps(self) -> int:
        return sum(int(entry[2]) for entry in self.engine.accountant.history)

    def epsilon(self) -> float:
        """Epsilon spent so far at ``target_delta`` (the accountant's upper bound); 0 before any step."""
        if not self.engine.accountant.history:
            return 0.0
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_ALPHA_WARNING)
            return float(self.engine.accountant.get_epsilon(delta=self.dp.target_delta))

    def extra_metrics(self) -> dict[str, float]:
        return {"dp/epsilon": self.epsilon(), "dp/steps": float(self.steps())}

    def extra_params(self) -> dict[str, Any]:
        return {
            "dp.noise_multiplier": self.noise_multiplier, "dp.max_grad_norm": self.dp.max_grad_norm,
            "dp.sample_rate": self.sample_rate, "dp.delta": self.dp.target_delta,
            "dp.target_epsilon": self.dp.target_epsilon, "dp.accountant": self.dp.accountant,
            "dp.poisson_sampling": True, "dp.secure_mode": self.dp.secure_mode,
            "dp.grad_sample_mode": self.grad_sample_mode, "dp.expected_batch_size": self.expected_batch_size,
            "dp.planned_steps": self.planned_steps, "dp.replaced_modules": _summary(self.replaced),
        }

    def state_dict(self) -> dict[str, Any]:
        """Accountant history as lists of [noise multiplier, sample rate, steps] (weights-only loadable)."""
        accountant = self.engine.accountant
        history = [[float(sigma), float(rate), int(n)] for sigma, rate, n in accountant.history]
        return {"accountant": {"mechanism": accountant.mechanism(), "history": history},
                "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                "grad_sample_mode": self.grad_sample_mode, "replaced_modules": list(self.replaced)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the privacy accounting exactly where the checkpoint stopped (call after ``prepare``)."""
        saved = state.get("accountant")
        if saved is None:
            raise CheckpointError("this checkpoint has no DP accountant state; it was not written by the dp "
                                  "trainer, so its privacy spending is unknown - start a new run")
        accountant = self.engine.accountant
        if saved["mechanism"] != accountant.mechanism():
            raise CheckpointError(f"the checkpoint was accounted with '{saved['mechanism']}' but training.dp."
                                  f"accountant is '{accountant.mechanism()}'; resume with the same accountant")
        accountant.load_state_dict({"mechanism": saved["mechanism"],
                                    "history": [(float(s), float(q), int(n)) for s, q, n in saved["history"]]})
        sigma = float(state.get("noise_multiplier", self.noise_multiplier))
        if self.dp.target_epsilon is not None and self.optimizer is not None and sigma != self.noise_multiplier:
            # The solve depends on num_epochs, which may grow on resume; the run keeps one noise level.
            log.warning("dp: keeping the run's noise multiplier %.4f (re-solving gave %.4f); with more epochs "
                        "than planned, epsilon will exceed target_epsilon %g", sigma, self.noise_multiplier,
                        self.dp.target_epsilon)
            self.optimizer.noise_multiplier = sigma
            self.noise_multiplier = sigma
