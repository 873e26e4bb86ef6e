"""Mixed precision written out by hand: fp32 master weights, bf16/fp16 compute, loss scaling.

A policy names the compute dtype. Under `bf16` or `fp16` the model's parameters are cast to
that dtype, so forward and backward run in it, and every *trainable* parameter gets a float32
master copy: gradients are accumulated into the master's .grad in float32, the optimizer
updates the master, and the new values are copied back into the model. Small updates survive
this way (an update below half a bf16 ulp of the weight would round away if applied to the
bf16 weight itself; Micikevicius et al. 2018, "Mixed Precision Training"). Frozen parameters
get no master and no optimizer state: they stay in the compute dtype, which is where LoRA's
memory saving comes from. Under `fp32` the parameters are their own masters.

Norms, softmax and the loss stay in float32 whatever the policy: RMSNorm/LayerNorm upcast in
model.py, scaled_dot_product_attention accumulates in float32, and loss.py casts the logits.

fp16 has 5 exponent bits, so small gradients underflow to zero. `LossScaler` multiplies the
loss by a large scale before backward and divides the gradients by it afterwards; when a
gradient overflows to inf/nan the step is skipped and the scale halves, and after
`growth_interval` clean steps it doubles (the dynamic scheme of torch.amp.GradScaler, written
out here so each step is visible in the training loop).

Under FSDP (--fsdp, minituner/sharding.py) it is the same idea, with FSDP's MixedPrecisionPolicy
making the casts, and each process holding a slice of every master instead of all of it:

    without FSDP (MasterWeights)                     with FSDP (MasterWeights.of_sharded)
    a float32 master copy of each trained weight      the sharded float32 parameter: its slice is the master
    the model's weights cast to bf16/fp16, once       each block's slices gathered and cast to param_dtype
      after every update                                (bf16/fp16) just before it runs, then freed
    bf16/fp16 gradients added into the fp32 .grad     gradients reduce-scattered in reduce_dtype float32
      (then summed over processes, in float32)          into the slice's .grad, summed over processes
    AdamW steps the masters; copied into the model    AdamW steps the slices; the next gather casts them

A frozen base stays in the compute dtype either way; the loss scaler works unchanged.
"""

from dataclasses import dataclass

import torch
from torch import nn

from minituner.errors import OptionError, UserError

POLICIES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise OptionError("precision", f"{policy!r}: must be one of {', '.join(POLICIES)}")


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 in hardware: GPUs from Ampere (compute capability 8.0)
    on. Older ones only emulate it, slowly; torch.cuda.is_bf16_supported() says yes to those by
    default. (A CPU computes bf16 correctly, if not always fast.)"""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 0)


def slow_cpu_bf16(device: torch.device, cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether `device` is a CPU whose flags (Linux's /proc/cpuinfo) list neither AVX-512 BF16 nor
    AMX-BF16, so that its bf16 matmuls are emulated: measured 42x slower than float32 on a 2-core
    AVX2 EPYC (2048 x 256 x 688). False where the flags cannot be read (another system)."""
    if device.type != "cpu":
        return False
    try:
        with open(cpuinfo, encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return False
    return flags is not None and not {"avx512_bf16", "amx_bf16"} & set(flags)


def auto_dtype(device: torch.device) -> torch.dtype:
    """The compute dtype 'auto' means: bf16 on a GPU that has it, fp16 on an older GPU, and
    fp32 on the CPU (exact, and not every CPU computes bf16 fast)."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if native_bf16(device) else torch.float16


def compute_dtype(policy: str, device: torch.device) -> torch.dtype:
    """The compute dtype of `policy`, after checking `device` can train in it."""
    check_policy(policy)
    dtype = POLICIES[policy]
    if dtype == torch.bfloat16 and not native_bf16(device):
        raise OptionError("precision", f"bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support; "
                                       "use fp16 or fp32")
    if dtype != torch.float32:
        try:
            _probe(dtype, device)
        except (RuntimeError, NotImplementedError) as e:
            first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise OptionError("precision", f"{policy}: {device} cannot train in {dtype} ({first_line})") from None
    return dtype


def _probe(dtype: torch.dtype, device: torch.device) -> None:
    """One tiny matmul forward and backward in `dtype`: the ops every training step needs."""
    w = torch.ones(8, 8, dtype=dtype, device=device, requires_grad=True)
    (torch.ones(2, 8, dtype=dtype, device=device) @ w).float().sum().backward()


class MasterWeights:
    """The float32 weights the optimizer updates, each paired with the model parameter it feeds.

    Construction moves `model` to `device` (default: where it is) and casts it to `dtype`,
    frozen parameters included, after taking a float32 copy of every trainable parameter there;
    under float32 no copy is made. Moving and casting in one go means a float32 base model bound
    for bf16 never occupies the device in float32.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype, device: torch.device | None = None):
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.dtype = dtype
        device = device or next(model.parameters()).device
        if dtype == torch.float32:
            model.to(device=device, dtype=dtype)
            self.masters = self.params  # fp32 parameters are their own masters
        else:
            # No copy where the parameter is float32 on `device` already: its storage becomes the
            # master as model.to() gives the parameter a new tensor (Module.to keeps the Parameters).
            self.masters = [nn.Parameter(p.detach().to(device=device, dtype=torch.float32)) for p in self.params]
            model.to(device=device, dtype=dtype)
        self.grad_buffer: torch.Tensor | None = None  # the step's float32 gradients, flat (see below)
        self.sharded = False

    @classmethod
    def of_sharded(cls, model: nn.Module) -> "MasterWeights":
        """The masters of a model sharded by FSDP (minituner/sharding.py): its trainable float32
        parameters themselves, each a DTensor holding this process's slice; FSDP casts them to
        the compute dtype as it gathers them, and reduces their gradients in float32."""
        self = cls.__new__(cls)
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.names = [name for name, _ in named]
        self.params = self.masters = [p for _, p in named]
        self.dtype, self.grad_buffer, self.sharded = torch.float32, None, True
        return self

    def named_masters(self) -> list[tuple[str, nn.Parameter]]:
        return list(zip(self.names, self.masters))

    # Gradients. Under bf16/fp16 the masters' float32 gradients live in one flat buffer, made by
    # the step's first accumulate_grads (after its backward pass, when the activations are gone:
    # no higher peak than per-tensor gradients), so that summing them over ranks is one in-place
    # collective. Under fp32 autograd accumulates into the parameters' own .grad; with several
    # ranks begin_step(flat=True) first points those at views of one zeroed buffer (as DDP's
    # gradient_as_bucket_view does), and alone they stay per tensor. Between steps none is kept.
    def begin_step(self, flat: bool) -> None:
        """Before a step's first backward: under fp32 with flat=True, gradients go to one buffer
        (not when sharded: FSDP keeps each slice's gradient)."""
        if flat and self.masters is self.params and not self.sharded:
            self.grad_buffer = torch.zeros(sum(m.numel() for m in self.masters), dtype=torch.float32,
                                           device=self.masters[0].device)
            self._attach(self.grad_buffer)

    def _attach(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        views = [view.view_as(m) for m, view in zip(self.masters, buffer.split([m.numel() for m in self.masters]))]
        for m, view in zip(self.masters, views):
            m.grad = view
        return views

    @torch.no_grad()
    def accumulate_grads(self) -> None:
        """Add the gradients of one backward pass into the masters' float32 .grad and drop the
        compute-dtype ones: a copy the first time in a step, an add after, over all tensors at
        once (_foreach ops; a parameter no gradient reached gets zeros the first time)."""
        if self.masters is self.params:
            return  # fp32: autograd already accumulated into the masters' .grad
        pairs = [(i, p.grad) for i, p in enumerate(self.params) if p.grad is not None]
        if self.grad_buffer is None:
            self.grad_buffer = torch.zeros(sum(m.numel() for m in self.masters), dtype=torch.float32,
                                           device=self.masters[0].device)
            views = self._attach(self.grad_buffer)
            if pairs:
                torch._foreach_copy_([views[i] for i, _ in pairs], [g for _, g in pairs])  # upcasts into fp32
        elif pairs:
            torch._foreach_add_([self.masters[i].grad for i, _ in pairs], [g for _, g in pairs])
        for p in self.params:
            p.grad = None

    def grads(self) -> list[torch.Tensor]:
        """The masters' gradients, creating zero ones for parameters that got none this step;
        sharded, this process's slices of them (in place: scaling them scales the gradients)."""
        for m in self.masters:
            if m.grad is None:
                m.grad = torch.zeros_like(m)
        return [m.grad.to_local() if self.sharded else m.grad for m in self.masters]

    def zero_grads(self) -> None:
        """Drop the step's gradients (their memory is free until the next backward)."""
        self.grad_buffer = None
        for m in self.masters:
            m.grad = None
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Round the updated masters into the model's compute-dtype parameters, in a few kernels."""
        if self.masters is not self.params:
            torch._foreach_copy_(self.params, self.masters)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: m.detach() for name, m in zip(self.names, self.masters)}

    def check_shapes(self, found: dict, source: str) -> None:
        """A UserError unless `found` {name: shape} (a checkpoint's) names exactly the masters, in their shapes."""
        expected = {name: tuple(m.shape) for name, m in zip(self.names, self.masters)}
        found = {name: tuple(shape) for name, shape in found.items()}
        if expected != found:
            missing = sorted(set(expected) - set(found))[:3]
            unexpected = sorted(set(found) - set(expected))[:3]
            shapes = [n for n in expected.keys() & found.keys() if expected[n] != found[n]][:3]
            raise UserError(f"{source}: holds weights of a different model or method "
                            f"(missing {missing}, unexpected {unexpected}, other shape {shapes})")

    @torch.no_grad()
    def load_state_dict(self, weights: dict[str, torch.Tensor], source: str) -> None:
        """Load float32 master values by name (a checkpoint's), then refresh the model."""
        self.check_shapes({name: t.shape for name, t in weights.items()}, source)
        for name, m in zip(self.names, self.masters):  # (sharded: `weights` are sharded as the masters are)
            m.copy_(weights[name])
        self.copy_to_model()


@dataclass
class LossScaler:
    """Dynamic loss scaling for fp16; a scaler built with enabled=False always has scale 1.

    init_scale       the first scale; 2**16 as in torch.amp.GradScaler
    growth_factor    multiplies the scale after `growth_interval` steps in a row without overflow
    backoff_factor   multiplies the scale on every overflow (the step itself is skipped)
    growth_interval  clean steps before the scale grows
    min_scale        a scale below this means even tiny scaled gradients overflow: the model has
                     diverged or overflows in fp16 itself, and training stops with an error
    """

    enabled: bool = True
    init_scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    min_scale: float = 2.0**-14
    scale: float = 0.0
    good_steps: int = 0  # clean steps since the last growth or overflow

    def __post_init__(self):
        assert self.growth_factor > 1 and 0 < self.backoff_factor < 1 and self.growth_interval >= 1
        if not self.enabled:
            self.scale = 1.0
        elif self.scale == 0.0:
            self.scale = float(self.init_scale)

    def update(self, found_inf: bool) -> None:
        """After a step: back off on overflow, grow after `growth_interval` clean steps."""
        if not self.enabled:
            return
        if found_inf:
            self.scale *= self.backoff_factor
            self.good_steps = 0
            if self.scale < self.min_scale:
                raise UserError(f"fp16 loss scale fell to {self.scale:.3g}, below its floor {self.min_scale:.3g}: "
                                "the gradients overflow however small the scale, so the model overflows in fp16 "
                                "or has diverged; train in bf16 or fp32, or with a lower learning rate")
            return
        self.good_steps += 1
        if self.good_steps == self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])
