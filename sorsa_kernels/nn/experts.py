"""``SORSAExperts``: SORSA for the fused expert weights of a mixture-of-experts layer.

``transformers`` 5 stores the routed experts of Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, … as
3-D parameters (``gate_up_proj`` E×2I×H, ``down_proj`` E×H×I).  One ``SORSAExperts`` holds
one such stack split per expert: a frozen residual ``Wr`` E×m×n and trainable ``U`` E×m×r,
``S`` E×r, ``V`` E×n×r, with the orientation, ``alpha`` and ``scale`` rules of
:class:`~sorsa_kernels.nn.linear.SORSALinear` applied to each expert.  Its forward takes rows
grouped by expert and never forms an expert's dense ``ΔW``
(:func:`sorsa_kernels.ops.experts.sorsa_experts`).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from ..ops import reference
from ..ops.experts import sorsa_experts
from .checks import check_dtype, layer_suffix
from .factory import register_experts_class
from .init_spec import SORSAInit
from .lowrank import init_low_rank

__all__ = ["SORSAExperts", "DEFAULT_EXPERT_CHUNK", "expert_chunks", "check_expert_stack", "routed_experts_forward"]

#: Experts split (SVD, residual) or merged at a time: bounds the float32 temporaries of a
#: 128-expert layer to a few experts' worth instead of the whole stack.
DEFAULT_EXPERT_CHUNK = 8


def expert_chunks(E: int, chunk: int):
    """``slice`` s of at most ``chunk`` consecutive experts covering ``range(E)``."""
    for a in range(0, E, chunk):
        yield slice(a, min(a + chunk, E))


def _residual_stack(weight: Tensor, U0: Tensor, S0: Tensor, V0: Tensor, scale: float,
                    dtype: torch.dtype, chunk: int) -> Tensor:
    """``Wr = W0 − scale·U0·diag(S0)·V0ᵀ`` per expert, in float32 a chunk of experts at a time,
    stored in ``dtype`` (the same computation at initialization and on load)."""
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    for sl in expert_chunks(weight.shape[0], chunk):
        out[sl] = reference.compute_residual(weight[sl], U0[sl], S0[sl], V0[sl], scale).to(dtype)
    return out


def check_expert_stack(weight: Tensor, name: Optional[str]) -> None:
    """A ValueError unless ``weight`` is a 3-D stack E×out×in of a supported dtype."""
    if not isinstance(weight, Tensor) or weight.dim() != 3:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"expert weights must be a 3-D stack E×out×in, got {shape}{layer_suffix(name)}")
    check_dtype(weight.dtype, "weight dtype" + layer_suffix(name))


@register_experts_class
class SORSAExperts(nn.Module):
    """E SORSA linears in one stack: per expert ``y_e = x_e·Wr_eᵀ + scale·((x_e·V_e)·S_e)·U_eᵀ (+ b_e)``.

    Orientation per expert is :class:`~sorsa_kernels.nn.linear.SORSALinear`'s: ``U``
    E×out×r, ``S`` E×r, ``V`` E×in×r, ``residual`` E×out×in (frozen).  ``scale`` is
    ``alpha / rank`` when ``alpha`` is given, else 1; the initial ``S`` is ``σ / scale``.
    The forward takes rows grouped by expert and the per-expert row counts.

    Example::

        >>> w = torch.randn(4, 32, 16)                         # E × out × in
        >>> layer = SORSAExperts.from_weight(w, rank=4)
        >>> counts = torch.tensor([3, 0, 5, 2])               # rows of x grouped by expert
        >>> y = layer(torch.randn(10, 16), counts)            # 10 × 32
        >>> merged = layer.merged_weight()                    # E × out × in
    """

    #: Storage of the residual: None (dense).
    quantize: Optional[str] = None

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = False,
        *,
        alpha: Optional[float] = None,
        residual_dtype: torch.dtype = torch.float32,
        adapter_dtype: torch.dtype = torch.float32,
        device: Optional[Union[str, torch.device]] = None,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.check_residual_dtype(residual_dtype)
        init_low_rank(self, in_features, out_features, rank, bias=bias, alpha=alpha, residual_dtype=residual_dtype,
                      adapter_dtype=adapter_dtype, device=device, lead=(num_experts,))

    # ------------------------------------------------------------------ residual storage
    @staticmethod
    def check_residual_dtype(dtype: torch.dtype) -> None:
        """Refuse a residual dtype this class cannot store (one-line error)."""
        check_dtype(dtype, "residual_dtype")

    def allocate_residual(self, dtype: torch.dtype, device: Optional[Union[str, torch.device]]) -> None:
        """The frozen residual's (zero) storage: a dense E×out×in parameter."""
        self.residual = nn.Parameter(
            torch.zeros(self.num_experts, self.out_features, self.in_features, dtype=dtype, device=device),
            requires_grad=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_weight(
        cls,
        weight: Tensor,
        rank: Union[int, SORSAInit],
        *,
        bias: Optional[Tensor] = None,
        name: Optional[str] = None,
        expert_chunk: int = DEFAULT_EXPERT_CHUNK,
        **options: Any,
    ) -> "SORSAExperts":
        """Split each expert of ``weight`` (E×out×in) by SVD into a top-``rank`` part and a residual.

        ``rank`` is r or a whole :class:`~sorsa_kernels.nn.init_spec.SORSAInit`; ``options`` are
        its fields (``svd``, ``alpha``, ``residual_dtype``, …, as
        :meth:`SORSALinear.from_linear <sorsa_kernels.nn.linear.SORSALinear.from_linear>`; not
        ``dropout``).  The SVD runs batched over ``expert_chunk`` experts at a time, in
        ``svd_dtype``, on the weight's device (``svd="randomized"``: ``torch.svd_lowrank``,
        seeded); ``bias`` (E×out) is kept frozen.
        """
        spec = cls.init_spec(weight, rank, name, options)
        E, m, n = weight.shape
        r = spec.rank
        U0 = torch.empty(E, m, r, dtype=spec.factor_dtype, device=weight.device)
        S0 = torch.empty(E, r, dtype=spec.factor_dtype, device=weight.device)
        V0 = torch.empty(E, n, r, dtype=spec.factor_dtype, device=weight.device)
        with torch.no_grad():
            cls.split_experts(weight, spec, U0, S0, V0, expert_chunk)
        return cls.from_factors(weight, U0, S0, V0, bias=bias, alpha=spec.alpha, residual_dtype=spec.residual_dtype,
                                name=name, expert_chunk=expert_chunk)

    @classmethod
    def init_spec(cls, weight: Tensor, rank: Union[int, SORSAInit], name: Optional[str],
                  options: dict[str, Any]) -> SORSAInit:
        """The :class:`~sorsa_kernels.nn.init_spec.SORSAInit` of a ``from_weight`` call, with the
        stack checked against it (3-D, rank, dtype, finite values) before any SVD."""
        check_expert_stack(weight, name)
        spec = SORSAInit.for_layer(cls, rank, name, options)
        if spec.dropout:
            raise ValueError(f"dropout {spec.dropout} is not supported on expert weights{layer_suffix(name)}; "
                             "use dropout=0 or leave the experts out of target_modules")
        spec.check_weight(weight, name)
        cls.check_residual_dtype(spec.residual_dtype or weight.dtype)
        return spec

    @staticmethod
    def split_experts(weight: Tensor, spec: SORSAInit, U0: Tensor, S0: Tensor, V0: Tensor, expert_chunk: int) -> None:
        """Fill ``U0, S0, V0`` with each expert's top-``rank`` split (``S0 = σ / scale``), batched
        over ``expert_chunk`` experts at a time."""
        for sl in expert_chunks(weight.shape[0], expert_chunk):
            u, s, v = reference.principal_split(weight[sl], spec.rank, svd=spec.svd, niter=spec.niter,
                                                oversample=spec.oversample, dtype=spec.svd_dtype)
            U0[sl], S0[sl], V0[sl] = u, s / spec.scale, v

    @classmethod
    def from_factors(
        cls,
        weight: Tensor,
        U0: Tensor,
        S0: Tensor,
        V0: Tensor,
        *,
        trained: Optional[tuple[Tensor, Tensor, Tensor]] = None,
        bias: Optional[Tensor] = None,
        alpha: Optional[float] = None,
        residual_dtype: Optional[torch.dtype] = None,
        name: Optional[str] = None,
        expert_chunk: int = DEFAULT_EXPERT_CHUNK,
    ) -> "SORSAExperts":
        """Build the layer from known initial factors (no SVD), optionally with trained ones.

        The residual is recomputed from ``weight`` and ``(U0, S0, V0)`` by the same float32
        computation as at initialization, so a reloaded adapter reproduces training exactly.
        """
        check_expert_stack(weight, name)
        E, m, n = weight.shape
        r = S0.shape[-1]
        expected = {"U0": (E, m, r), "S0": (E, r), "V0": (E, n, r)}
        for label, t in zip(expected, (U0, S0, V0)):
            if tuple(t.shape) != expected[label]:
                raise ValueError(f"{label} has shape {tuple(t.shape)} but the experts need {expected[label]}"
                                 f"{layer_suffix(name)}")
        if trained is not None:
            for label, t, ref in zip(("U", "S", "V"), trained, (U0, S0, V0)):
                if t.shape != ref.shape:
                    raise ValueError(f"{label} has shape {tuple(t.shape)} but the experts need {tuple(ref.shape)}"
                                     f"{layer_suffix(name)}")
        if bias is not None and tuple(bias.shape) != (E, m):
            raise ValueError(f"bias has shape {tuple(bias.shape)} but the experts need {(E, m)}{layer_suffix(name)}")
        residual_dtype = residual_dtype or weight.dtype
        layer = cls(E, n, m, r, bias=bias is not None, alpha=alpha, residual_dtype=residual_dtype,
                    adapter_dtype=U0.dtype, device="meta")
        dev = weight.device
        U0, S0, V0 = (t.to(dev) for t in (U0, S0, V0))
        with torch.no_grad():
            layer.store_residual(weight.detach(), U0, S0, V0, residual_dtype, expert_chunk)
        src = trained if trained is not None else (U0, S0, V0)
        layer.U = nn.Parameter(src[0].detach().to(dev, U0.dtype).clone())
        layer.S = nn.Parameter(src[1].detach().to(dev, U0.dtype).clone())
        layer.V = nn.Parameter(src[2].detach().to(dev, U0.dtype).clone())
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().to(dev, residual_dtype).clone(), requires_grad=False)
        layer.init_factors = tuple(t.detach().to("cpu").clone() for t in (U0, S0, V0))
        return layer

    def store_residual(self, weight: Tensor, U0: Tensor, S0: Tensor, V0: Tensor, dtype: torch.dtype,
                       expert_chunk: int = DEFAULT_EXPERT_CHUNK) -> None:
        """Store ``Wr = W0 − scale·U0·diag(S0)·V0ᵀ`` (computed in float32 a chunk of experts at a
        time) as the frozen residual, in ``dtype``."""
        res = _residual_stack(weight, U0, S0, V0, self.scale, dtype, expert_chunk)
        self.residual = nn.Parameter(res, requires_grad=False)

    # ------------------------------------------------------------------ module API
    @property
    def weight(self) -> Tensor:
        """The frozen residual stack ``Wr`` (read-only alias, for ``.dtype`` / ``.device`` checks)."""
        return self.residual

    def forward(self, x: Tensor, counts: Tensor, **routing) -> Tensor:
        """``y`` (M×out) for rows ``x`` (M×in) grouped by expert, ``counts[e]`` rows for expert e;
        ``routing`` (``slots``, ``top_k``, ``gather``, ``scatter``, ``weights``): see
        :func:`~sorsa_kernels.ops.experts.sorsa_experts`."""
        return sorsa_experts(x, counts, self.residual, self.U, self.S, self.V, self.bias, self.scale, **routing)

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The trainable stacks ``[U, S, V]``."""
        return [self.U, self.S, self.V]

    def dense_residual(self, dtype: Optional[torch.dtype] = None, experts: Optional[slice] = None) -> Tensor:
        """The residual of ``experts`` (default all) as a dense stack in ``dtype`` (default its own).

        Example::

            >>> Wr = layer.dense_residual(torch.float32, slice(0, 2))   # experts 0 and 1
        """
        res = self.residual if experts is None else self.residual[experts]
        return res if dtype is None else res.to(dtype)

    def merged_weight(self, dtype: Optional[torch.dtype] = None, expert_chunk: int = DEFAULT_EXPERT_CHUNK) -> Tensor:
        """``Wr + scale·U·diag(S)·Vᵀ`` per expert (E×out×in), computed in float32 a chunk of
        experts at a time and stored in ``dtype`` (default: the residual's dtype)."""
        dtype = dtype or self.residual.dtype
        out = torch.empty(self.residual.shape, dtype=dtype, device=self.U.device)
        with torch.no_grad():
            for sl in expert_chunks(self.num_experts, expert_chunk):
                out[sl] = reference.merged_weight(self.dense_residual(torch.float32, sl), self.U[sl], self.S[sl],
                                                  self.V[sl], self.scale).to(dtype)
        return out

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, bias={self.bias is not None}, scale={self.scale:g}, "
            f"residual_dtype={self.residual.dtype}, adapter_dtype={self.U.dtype}"
        )


def routed_experts_forward(up: SORSAExperts, down: SORSAExperts, hidden_states: Tensor, top_k_index: Tensor,
                           top_k_weights: Tensor, activation: Callable[[Tensor], Tensor],
                           post_norm: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """A routed MoE experts block on SORSA experts: ``Σ_choices w·down(act(up(x)))`` per token (T×H).

    The (token, choice) pairs are sorted by expert on the device (no host sync: the counts come
    from ``index_add_``, not ``bincount``); ``up`` reads the token rows through the sort (no
    gathered copy), ``down`` multiplies each row by its routing weight and adds it into its token
    (no M×H scattered copy); the routing weights get their gradient.  ``post_norm`` (a norm
    between the experts and the routing multiply) keeps ``down``'s rows grouped, then weights
    and sums them.

    Example::

        >>> out = routed_experts_forward(experts.gate_up_proj, experts.down_proj, hidden, top_k_index,
        ...                              top_k_weights, experts._apply_gate)
    """
    tokens, top_k = top_k_index.shape
    ids = top_k_index.reshape(-1)
    _, slots = torch.sort(ids, stable=True)
    counts = torch.zeros(up.num_experts, dtype=torch.int64, device=ids.device).index_add_(
        0, ids, torch.ones_like(ids, dtype=torch.int64))
    weights = top_k_weights.reshape(-1)
    h = activation(up(hidden_states, counts, slots=slots, top_k=top_k, gather=True))
    if post_norm is None:
        out = down(h, counts, slots=slots, top_k=top_k, scatter=True, weights=weights)
    else:
        z = post_norm(down(h, counts))
        out = z.new_zeros(tokens, z.shape[1]).index_add_(0, slots // top_k, z * weights[slots, None].to(z.dtype))
    return out.to(hidden_states.dtype)
