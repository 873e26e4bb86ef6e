"""Rotary position embeddings (RoPE, Su et al. 2021) and their scalings, as the transformer
(model.py) applies them to queries and keys.

Angles are computed in float32 from the positions (no table, so no length limit and nothing
for `.to(dtype)` to round), with the reference implementation's arithmetic, so that the angles
at long positions are the ones the checkpoint was trained with, to the last bit.
"""

import math

import torch

from minituner.config import ModelConfig


def rope_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (D/2,) of the rotary embedding, and the factor on cos/sin.

    Plain RoPE (Su et al. 2021): inv_freq_i = theta^(-2i/D). The scalings stretch the long
    wavelengths to reach past the pretraining context:
      linear  every frequency / factor (position interpolation, Chen et al. 2023);
      llama3  wavelengths above original/low_freq_factor divided by factor, those below
              original/high_freq_factor kept, a smooth blend between (Llama 3.1);
      yarn    a per-dimension ramp between the two, and a temperature on cos/sin (Peng et al. 2023).
    Computed in float32 with the reference implementation's arithmetic, so that the angles at
    long positions are the ones the checkpoint was trained with, to the last bit.
    """
    D, theta, scaling = config.head_dim, config.rope_theta, config.rope_scaling
    dims = torch.arange(0, D, 2, dtype=torch.float32, device="cpu") / D  # (D/2,)
    inv_freq = 1.0 / (theta ** dims)
    kind = scaling["rope_type"] if scaling else "default"
    if kind == "default":
        return inv_freq, 1.0
    factor = scaling["factor"]
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "llama3":
        original, low, high = scaling["original_max_position_embeddings"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= original / high) & (wavelen <= original / low)
        return torch.where(medium, blended, scaled), 1.0
    return _yarn_frequencies(theta ** dims, D, theta, scaling)


def _yarn_frequencies(pos_freqs: torch.Tensor, D: int, theta: float, scaling: dict) -> tuple[torch.Tensor, float]:
    factor, original = scaling["factor"], scaling["original_max_position_embeddings"]

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def correction_dim(rotations):  # the dimension whose wavelength fits `rotations` times into `original`
        return D * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(scaling.get("beta_fast") or 32), correction_dim(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, D - 1)
    high = high + 0.001 if low == high else high
    ramp = ((torch.arange(D // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)  # 0 = keep
    keep = 1 - ramp
    return (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep, attention_factor


def rope_cos_sin(inv_freq: torch.Tensor, scale: float, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos and sin of the rotary angles position * inv_freq, each (B, T, D), in `dtype`."""
    angles = position_ids[..., None].float() * inv_freq  # (B, T, D/2), float32
    angles = torch.cat((angles, angles), dim=-1)  # (B, T, D): the rotate-half layout repeats the halves
    return (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+D/2}) by the angle of their position: the 'rotate half' layout of
    HF checkpoints, which pairs dimension i with i + D/2 rather than the paper's 2i with 2i+1."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    sin = sin[:, None, :, :half]  # the halves of sin repeat (rope_cos_sin): one is enough
    out = x * cos[:, None]  # cos (B, 1, T, D) broadcast over heads
    # x * cos + cat(-x2, x1) * sin, written into the halves: no rotated copy, no negated one (a - b*s is
    # a + (-b)*s to the bit)
    out[..., :half] -= x2 * sin
    out[..., half:] += x1 * sin
    return out
