"""RWKV-7 ("Goose") time mixing: a DPLR delta-rule recurrence fed by token-shifted projections.

Paper: RWKV-7 "Goose" with Expressive Dynamic State Evolution, https://arxiv.org/abs/2503.14456.
The module mirrors ``fla.layers.RWKV7Attention`` (fla 0.6): same parameter names and shapes, so an
fla state_dict loads with ``strict=True`` and gives the same outputs; same defaults and init. Per
token, with ``x'`` the previous token's input (the token-shift tail)::

    x_c   = x + (x' - x) * x_c                        c in r, w, k, v, a, g (learned mixes)
    r, k, v = r_proj(x_r), k_proj(x_k), v_proj(x_v)
    w     = -exp(-1/2) * sigmoid(w_lora(x_w))         per-key log decay in [-0.61, 0)
    v     = lerp(v, v_first, sigmoid(v_lora(x_v)))    all but the first layer: value residual
    a     = sigmoid(a_lora(x_a))                      in-context learning rate
    kk    = l2norm_per_head(k * k_k);  k = k * (1 + (a - 1) * k_a)
    o     = DPLR(r, k, v, a=-kk, b=kk*a, w; scale 1)  blocks.ops.dplr
    y     = o_proj((GroupNorm_heads(o) + sum(r*k*r_k) v) * g_lora(x_g))

Cross-layer value stream: the first RWKV-7 layer (``layer_idx == 0`` unless ``v_first_source`` says
otherwise) has no ``v_lora``; it writes its values to ``ctx["v_first"]`` ([B, T, value_dim]) and
every later RWKV-7 layer of the same forward reads them from there. ``ctx`` is the model's
per-forward dict, so no global carries the stream.

State (:class:`RWKV7State`): the [B, H, K, V] fp32 recurrent matrix, the last input token
(``shift``, [B, d_model]) and ``seq_len``; any number of new tokens continues it exactly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blocks.config import ConfigError, require, require_choice, require_positive
from blocks.documents import documents_in
from blocks.ops.backend import BACKENDS
from blocks.ops.dplr import DEFAULT_CHUNK_SIZE, dplr_delta_rule
from blocks.registry import register_mixer
from blocks.state import LayerState, StateError

DECAY_LOWER_BOUND = -math.exp(-0.5)  # w = DECAY_LOWER_BOUND * sigmoid(.): the decay exp(w) stays in (0.545, 1)


@dataclasses.dataclass
class RWKV7State(LayerState):
    """RWKV-7 decoding state: recurrent matrix, token-shift tail and tokens seen."""

    kind: ClassVar[str] = "recurrent"

    recurrent: Tensor  # [B, H, K, V] fp32
    shift: Tensor  # [B, d_model] the input of the last token seen (zeros before the first)
    seq_len: int = 0


@dataclasses.dataclass
class RWKV7Config:
    """Options of :class:`RWKV7Attention` (fla's names and defaults).

    head_dim / num_heads: one of them fixes the other (``d_model = num_heads * head_dim``); fla's
        default is ``head_dim=64``. Setting both requires them to agree.
    decay_low_rank_dim, gate_low_rank_dim, a_low_rank_dim, v_low_rank_dim: LoRA ranks of ``w``,
        ``g``, ``a`` and ``v``; ``None`` derives them from d_model and head_dim as fla does.
    value_dim: total value width (``None``: d_model).
    elementwise_affine: learn the output GroupNorm's weight and bias.
    norm_eps: GroupNorm eps per channel (the norm uses ``head_dim * norm_eps``, as fla).
    fuse_norm: fla's fused-norm variant; numerically it only changes kk's L2 norm to
        ``x / sqrt(sum x^2 + 1e-6)``. fla's RWKV7 *models* default to True, its layer to False.
    num_hidden_layers: depth of the model, used only by the depth-dependent init (``None``: the
        ``n_layers`` the model passes, or, for a standalone layer, this layer is taken to be the last).
    v_first_source: whether this layer starts the v_first stream (``None``: ``layer_idx == 0``).
    chunk_size: tokens per chunk of the torch op.
    backend: ``auto`` (fla kernels on CUDA, torch ops elsewhere), ``torch`` or ``fla``.
    """

    head_dim: int | None = 64
    num_heads: int | None = None
    decay_low_rank_dim: int | None = None
    gate_low_rank_dim: int | None = None
    a_low_rank_dim: int | None = None
    v_low_rank_dim: int | None = None
    value_dim: int | None = None
    elementwise_affine: bool = True
    norm_eps: float = 1e-5
    fuse_norm: bool = False
    num_hidden_layers: int | None = None
    v_first_source: bool | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE
    backend: str = "auto"

    def __post_init__(self):
        require(self.head_dim is not None or self.num_heads is not None, "head_dim",
                "head_dim and num_heads cannot both be null")
        for name in ("head_dim", "num_heads", "decay_low_rank_dim", "gate_low_rank_dim", "a_low_rank_dim",
                     "v_low_rank_dim", "value_dim", "num_hidden_layers"):
            if getattr(self, name) is not None:
                require_positive(name, getattr(self, name))
        require(isinstance(self.norm_eps, (int, float)) and self.norm_eps > 0, "norm_eps",
                f"must be a number > 0, got {self.norm_eps!r}")
        require_positive("chunk_size", self.chunk_size)
        require_choice("backend", self.backend, BACKENDS)


class LoRA(nn.Module):
    """Low-rank projection ``Linear(in, r) -> activation -> Linear(r, out)`` (fla's ``LoRA``, same names)."""

    def __init__(self, input_dim: int, output_dim: int, low_rank_dim: int, bias: bool = True,
                 activation: str | None = "tanh"):
        super().__init__()
        act = {None: nn.Identity, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}[activation]
        self.lora = nn.Sequential(
            nn.Linear(input_dim, low_rank_dim, bias=False),
            act(),
            nn.Linear(low_rank_dim, output_dim, bias=bias),
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """fla's LoRA init: zero down-projection, orthogonal up-projection of gain 0.1 (x sqrt(r/out) if r > out)."""
        nn.init.zeros_(self.lora[0].weight)
        out_dim, rank = self.lora[2].weight.shape
        nn.init.orthogonal_(self.lora[2].weight, gain=0.1 * (math.sqrt(rank / out_dim) if rank > out_dim else 1.0))
        if self.lora[2].bias is not None:
            nn.init.zeros_(self.lora[2].bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.lora(x)


def _heads(x: Tensor, head_dim: int) -> Tensor:
    """[B, T, H * head_dim] -> [B, T, H, head_dim]."""
    return x.unflatten(-1, (-1, head_dim))


def _default_rank(scale: float, d_model: int, head_factor: float) -> int:
    """fla's LoRA rank rule: ``scale * sqrt(d_model) * head_factor`` rounded to a multiple of 32, at least 32."""
    return max(32, int(round(scale * d_model**0.5 * head_factor / 32) * 32))


@register_mixer("rwkv7", symbol="R", state=RWKV7State)
class RWKV7Attention(nn.Module):
    """RWKV-7 time mixing (fla.layers.RWKV7Attention), v_first passed through ``ctx``."""

    Config = RWKV7Config

    def __init__(self, config: RWKV7Config, d_model: int, layer_idx: int = 0, n_layers: int | None = None):
        super().__init__()
        require_positive("d_model", d_model)
        self.config = config
        self.d_model = d_model
        self.layer_idx = layer_idx
        self.n_layers = config.num_hidden_layers or n_layers
        self.num_heads, self.head_dim = self._resolve_heads(config, d_model)
        self.key_dim = d_model
        self.value_dim = config.value_dim if config.value_dim is not None else d_model
        require(self.value_dim % self.num_heads == 0, "value_dim",
                f"must be divisible by the number of heads ({self.num_heads}), got {self.value_dim}")
        self.head_v_dim = self.value_dim // self.num_heads
        require(self.head_v_dim >= 2, "head_dim", f"the output GroupNorm needs at least 2 values per head; "
                                                  f"{self.num_heads} heads leave {self.head_v_dim} of value_dim "
                                                  f"{self.value_dim}: use fewer, wider heads")
        if self.n_layers is not None:
            require(layer_idx < self.n_layers, "num_hidden_layers",
                    f"must exceed the layer index ({layer_idx}), got {self.n_layers}")
        self.v_first_source = layer_idx == 0 if config.v_first_source is None else config.v_first_source

        head_factor = self.head_dim / 64  # fla widens the w/a/v LoRAs for heads wider than 64
        decay_rank = config.decay_low_rank_dim or _default_rank(2.5, d_model, head_factor)
        gate_rank = config.gate_low_rank_dim or _default_rank(5.0, d_model, 1.0)
        a_rank = config.a_low_rank_dim or _default_rank(2.5, d_model, head_factor)
        v_rank = config.v_low_rank_dim or _default_rank(1.7, d_model, head_factor)

        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            setattr(self, name, nn.Parameter(torch.zeros(1, 1, d_model)))
        self.k_k = nn.Parameter(torch.zeros(self.key_dim))
        self.k_a = nn.Parameter(torch.zeros(self.key_dim))
        self.r_k = nn.Parameter(torch.zeros(self.num_heads, self.head_dim))

        self.r_proj = nn.Linear(d_model, self.key_dim, bias=False)
        self.k_proj = nn.Linear(d_model, self.key_dim, bias=False)
        self.v_proj = nn.Linear(d_model, self.value_dim, bias=False)
        self.o_proj = nn.Linear(self.value_dim, d_model, bias=False)

        self.w_lora = LoRA(d_model, self.key_dim, decay_rank, activation="tanh")
        if not self.v_first_source:
            self.v_lora = LoRA(d_model, self.value_dim, v_rank, activation=None)
        self.a_lora = LoRA(d_model, self.key_dim, a_rank, activation=None)
        self.g_lora = LoRA(d_model, self.value_dim, gate_rank, activation="sigmoid", bias=False)
        self.g_norm = nn.GroupNorm(self.num_heads, self.value_dim, eps=self.head_dim * config.norm_eps,
                                   affine=config.elementwise_affine)
        self.reset_parameters()

    @staticmethod
    def _resolve_heads(config: RWKV7Config, d_model: int) -> tuple[int, int]:
        head_dim, num_heads = config.head_dim, config.num_heads
        if head_dim is not None and num_heads is not None and head_dim * num_heads != d_model:
            raise ConfigError("num_heads", f"num_heads ({num_heads}) * head_dim ({head_dim}) must equal d_model "
                                           f"({d_model}); set head_dim: null to derive it from num_heads")
        if head_dim is not None:
            require(d_model % head_dim == 0, "head_dim", f"must divide d_model ({d_model}), got {head_dim}")
            return d_model // head_dim, head_dim
        require(d_model % num_heads == 0, "num_heads", f"must divide d_model ({d_model}), got {num_heads}")
        return num_heads, d_model // num_heads

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """fla's RWKV-7 init, which depends on the layer's relative depth (see RWKV7Config.num_hidden_layers)."""
        n_layers = self.n_layers or self.layer_idx + 1
        depth = self.layer_idx / max(n_layers - 1, 1)  # 0 at the first layer, 1 at the last
        keep = 1.0 - self.layer_idx / n_layers  # 1 at the first layer, towards 0 at the last
        C, D = self.d_model, self.head_dim
        n = torch.arange(C, dtype=torch.float32)
        ddd = (n / C).view(1, 1, C)
        linear = n / max(C - 1, 1) - 0.5  # [-0.5, 0.5] across channels
        zigzag = ((n % D) - (D - 1) / 2) / max((D - 1) / 2, 1e-9)  # [-1, 1] within each head
        zigzag = zigzag * zigzag.abs()
        decay_bias = -6 + 6 * (n / max(C - 1, 1)) ** (1 + depth**0.3)

        for name, power in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
            getattr(self, name).copy_(1.0 - ddd.pow(power * keep))
        nn.init.constant_(self.k_a, 1.02)
        nn.init.constant_(self.r_k, -0.04)
        self.k_k.copy_(0.71 - linear * 0.1)
        for lora in (self.w_lora, self.a_lora, self.g_lora):
            lora.reset_parameters()
        self.w_lora.lora[2].bias.copy_(decay_bias + 0.5 + zigzag * 2.5)
        self.a_lora.lora[2].bias.copy_(-0.19 + zigzag * 0.3 + linear * 0.4)
        if not self.v_first_source:
            self.v_lora.reset_parameters()
            v_linear = torch.arange(self.value_dim, dtype=torch.float32) / max(self.value_dim - 1, 1) - 0.5
            self.v_lora.lora[2].bias.copy_(0.73 - v_linear * 0.4)
        if self.g_norm.affine:
            self.g_norm.weight.fill_(((self.layer_idx + 1) / n_layers) ** 0.7)
            nn.init.zeros_(self.g_norm.bias)
        nn.init.orthogonal_(self.r_proj.weight)
        nn.init.orthogonal_(self.k_proj.weight, gain=0.1)
        nn.init.orthogonal_(self.v_proj.weight)
        nn.init.zeros_(self.o_proj.weight)

    def empty_state(self, batch_size: int, device: torch.device | None = None,
                    dtype: torch.dtype | None = None) -> RWKV7State:
        """The state before any token: zero matrix, zero shift tail."""
        device = device or self.r_proj.weight.device
        return RWKV7State(
            recurrent=torch.zeros(batch_size, self.num_heads, self.head_dim, self.head_v_dim, device=device),
            shift=torch.zeros(batch_size, self.d_model, device=device, dtype=dtype or self.r_proj.weight.dtype),
        )

    def _check_state(self, state: RWKV7State, batch: int) -> None:
        if not isinstance(state, RWKV7State):
            raise StateError(f"RWKV-7 layer {self.layer_idx} got a {type(state).__name__}, expected RWKV7State")
        want = {"recurrent": (batch, self.num_heads, self.head_dim, self.head_v_dim), "shift": (batch, self.d_model)}
        for name, shape in want.items():
            if tuple(getattr(state, name).shape) != shape:
                raise StateError(f"RWKV7State.{name} has shape {tuple(getattr(state, name).shape)}, "
                                 f"this layer needs {shape}")

    def forward(self, x: Tensor, state: RWKV7State | None = None,
                ctx: dict | None = None) -> tuple[Tensor, RWKV7State | None]:
        """``x`` [B, T, d_model] -> ``(y [B, T, d_model], state)``; ``ctx["v_first"]`` links the layers.
        With ``ctx["documents"]`` each packed document starts from an empty history (the token shift
        sees zero before its first token; the state returned is None). ``v_first`` is per token and
        needs nothing more."""
        if x.dim() != 3 or x.shape[-1] != self.d_model or x.shape[1] == 0:
            raise ValueError(f"RWKV-7 expects x of shape [B, T>0, {self.d_model}], got {tuple(x.shape)}")
        B, T, _ = x.shape
        documents = documents_in(ctx, x, state, f"RWKV-7 layer {self.layer_idx}")
        if state is None:
            state = self.empty_state(B, x.device, x.dtype)
        self._check_state(state, B)

        previous = torch.cat([state.shift[:, None].to(x.dtype), x[:, :-1]], dim=1)  # [B, T, C] token shift
        if documents is not None:
            previous = documents.restart(previous, 0.0)  # a document's first token follows nothing
        delta = previous - x  # [B, T, C]
        xr, xw, xk, xv, xa, xg = (torch.addcmul(x, delta, mix) for mix in
                                  (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g))

        r = self.r_proj(xr)  # [B, T, key_dim]
        w = DECAY_LOWER_BOUND * self.w_lora(xw).sigmoid()  # [B, T, key_dim] log decay
        k = self.k_proj(xk)  # [B, T, key_dim]
        v = self.v_proj(xv)  # [B, T, value_dim]
        if self.v_first_source:
            if ctx is not None:
                ctx["v_first"] = v
        else:
            v = torch.lerp(v, self._v_first(ctx, B, T), self.v_lora(xv).sigmoid())  # [B, T, value_dim]
        a = self.a_lora(xa).sigmoid()  # [B, T, key_dim] in-context learning rate
        g = self.g_lora(xg)  # [B, T, value_dim] output gate

        kk = _heads(k * self.k_k, self.head_dim)  # [B, T, H, K] removal key
        if self.config.fuse_norm:
            kk = kk * torch.rsqrt(kk.square().sum(-1, keepdim=True) + 1e-6)
        else:
            kk = F.normalize(kk, p=2.0, dim=-1)
        k = k.addcmul(k * (a - 1), self.k_a)  # k * (1 + (a - 1) * k_a)
        r, w, k, a = (_heads(t, self.head_dim) for t in (r, w, k, a))  # [B, T, H, K]
        v = _heads(v, self.head_v_dim)  # [B, T, H, V]

        if documents is not None:  # the rows as one sequence of documents (fla's varlen layout)
            o, _ = dplr_delta_rule(*(documents.flat(t) for t in (r, k, v, -kk, kk * a, w)), scale=1.0,
                                   chunk_size=self.config.chunk_size, w_lower_bound=DECAY_LOWER_BOUND,
                                   backend=self.config.backend, cu_seqlens=documents.cu_seqlens)
            o = documents.unflat(o)  # [B, T, H, V]
        else:
            o, recurrent = dplr_delta_rule(
                r, k, v, -kk, kk * a, w, scale=1.0, initial_state=state.recurrent, output_final_state=True,
                chunk_size=self.config.chunk_size, w_lower_bound=DECAY_LOWER_BOUND, backend=self.config.backend,
            )  # o [B, T, H, V]

        o = self.g_norm(o.reshape(B * T, self.value_dim)).view(B, T, self.value_dim)  # per-head GroupNorm
        bonus = (r * k * self.r_k).sum(-1, keepdim=True) * v  # [B, T, H, V] current-token term
        y = self.o_proj((o + bonus.flatten(-2)) * g)  # [B, T, d_model]
        if documents is not None:
            return y, None
        return y, RWKV7State(recurrent=recurrent, shift=x[:, -1], seq_len=state.seq_len + T)

    def _v_first(self, ctx: dict | None, B: int, T: int) -> Tensor:
        v_first = None if ctx is None else ctx.get("v_first")
        if v_first is None:
            raise ValueError(
                f"RWKV-7 layer {self.layer_idx} mixes its values towards ctx['v_first'], which no earlier layer "
                "set: run the model's first RWKV-7 layer (layer_idx 0, or v_first_source: true) in the same "
                "forward and pass the same ctx dict to every layer")
        if tuple(v_first.shape) != (B, T, self.value_dim):
            raise ValueError(f"RWKV-7 layer {self.layer_idx}: ctx['v_first'] has shape {tuple(v_first.shape)}, "
                             f"needs {(B, T, self.value_dim)}")
        return v_first
