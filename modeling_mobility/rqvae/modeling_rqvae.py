"""RQ-VAE location quantizer of QT-Mob (arXiv 2506.11109, Section 4.2), after LC-Rec and TIGER.

A location's semantic embedding goes through an MLP encoder to a small latent, which `num_quantizers` residual
codebooks quantize coarse to fine (level l quantizes what levels < l left over); a mirrored MLP decoder reconstructs
the embedding from the sum of the chosen code vectors. The code tuple is the location's token sequence
(`<a_i><b_j>...`).

Beyond the paper code this file adds: k-means++ initialisation as a pure function, dead-code re-seeding, a Sinkhorn
assignment that also works for groups smaller than the codebook, and [`RQVAEModel.get_unique_codes`], which gives
*every* location a distinct code tuple (the paper code keeps whatever collisions remain after its Sinkhorn rounds;
users of its ancestor LC-Rec report collision rates around 0.3 on new data).

The file imports only torch and transformers (and its sibling configuration file), so a saved folder loads with
`AutoModel.from_pretrained(folder, trust_remote_code=True)` without this library installed.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput, logging

from .configuration_rqvae import RQVAEConfig

__all__ = ["RQVAEModel", "RQVAEOutput", "RQVAEPreTrainedModel", "codebook_statistics", "kmeans", "sinkhorn_assign"]

logger = logging.get_logger(__name__)

# Rows encoded per chunk in the no-grad helpers (bounds peak memory on large location tables).
_CHUNK = 32768


# helper functions


def _squared_distances(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances `(N, K)` between rows of `x` `(N, D)` and codes `(K, D)`."""
    # ||x||² - 2 x·c + ||c||², clamped at 0 against rounding
    d = torch.addmm(codebook.pow(2).sum(1)[None, :], x, codebook.t(), alpha=-2.0)
    return (d + x.pow(2).sum(1, keepdim=True)).clamp_min_(0.0)


def _sample_index(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    """One index drawn with probability proportional to `weights` (no category limit, unlike `multinomial`)."""
    cumulative = torch.cumsum(weights.double(), 0)
    total = cumulative[-1]
    if not torch.isfinite(total) or total <= 0:
        return int(torch.randint(len(weights), (1,), generator=generator, device=weights.device))
    draw = torch.rand(1, generator=generator, device=weights.device, dtype=torch.float64) * total
    return min(int(torch.searchsorted(cumulative, draw)), len(weights) - 1)


def kmeans(
    samples: torch.Tensor, num_clusters: int, num_iters: int = 50, generator: torch.Generator | None = None
) -> torch.Tensor:
    """k-means++ seeding followed by `num_iters` Lloyd iterations; returns the centroids `(num_clusters, D)`.

    Deterministic given the generator (or the global torch seed). With fewer distinct samples than clusters, the
    spare centroids are copies of samples plus a small jitter, so every centroid stays distinct.
    """
    x = samples.detach().float()
    n = x.shape[0]
    if n == 0:
        raise ValueError("`samples` must contain at least one row for k-means, got 0 rows.")
    # k-means++ seeding: each new centroid is a sample drawn with probability ∝ squared distance to the nearest one
    first = int(torch.randint(n, (1,), generator=generator, device=x.device))
    chosen = [first]
    nearest = _squared_distances(x, x[first : first + 1])[:, 0]
    for _ in range(1, num_clusters):
        idx = _sample_index(nearest, generator)
        chosen.append(idx)
        nearest = torch.minimum(nearest, _squared_distances(x, x[idx : idx + 1])[:, 0])
    centroids = x[torch.tensor(chosen, device=x.device)].clone()
    # Lloyd iterations; an emptied cluster keeps its centroid
    for _ in range(num_iters):
        one_hot = F.one_hot(_squared_distances(x, centroids).argmin(1), num_clusters).to(x.dtype)  # (N, K)
        sums = one_hot.t() @ x  # (K, D); a matmul is much faster than index_add_ on CPU
        counts = one_hot.sum(0)
        updated = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1.0)[:, None], centroids)
        shift = (updated - centroids).abs().max()
        centroids = updated
        if shift <= 1e-7:
            break
    # duplicates (fewer distinct samples than clusters): jitter the repeats so every code is distinct
    _, inverse, counts = torch.unique(centroids, dim=0, return_inverse=True, return_counts=True)
    if bool((counts > 1).any()):
        scale = x.std().clamp_min(1e-6) * 1e-3
        repeat = torch.zeros(num_clusters, dtype=torch.bool, device=x.device)
        seen: set[int] = set()
        for i, group in enumerate(inverse.tolist()):
            if group in seen:
                repeat[i] = True
            seen.add(group)
        noise = torch.randn(centroids.shape, generator=generator, device=x.device) * scale
        centroids = torch.where(repeat[:, None], centroids + noise, centroids)
    return centroids


def sinkhorn_assign(
    distances: torch.Tensor,
    epsilon: float,
    num_iters: int,
    groups: torch.Tensor | None = None,
) -> torch.LongTensor:
    """Balanced code assignment by entropic optimal transport (Sinkhorn-Knopp), as on the last level of QT-Mob.

    Rows are independent problems per group (`groups`, ids in `[0, G)`; one group when `None`). Within a group of `n`
    rows, the distances are centred and scaled to [-1, 1] and the transport plan `P = diag(u) exp(-d / epsilon)
    diag(v)` is fitted by `num_iters` alternating row/column normalisations so that every row carries mass 1 and every
    code receives `max(1, n / K)`:

    - `n >= K` (a training batch, a whole location table): each code gets an equal share `n / K` (the paper's
      balanced assignment, which spreads rows over the codes and breaks collisions);
    - `n < K` (a small collision group): a slack row of mass `K - n` with constant cost absorbs the unused capacity,
      so each code receives at most one row's mass: an entropic relaxation of the one-to-one assignment problem.

    Each row then takes the code with the largest plan entry. Computed in float64.

    Args:
        distances (`torch.Tensor` of shape `(N, K)`): row-to-code distances.
        epsilon (`float`): entropic regularisation (after scaling to [-1, 1]).
        num_iters (`int`): Sinkhorn iterations.
        groups (`torch.LongTensor` of shape `(N,)`, *optional*): group id of every row.

    Returns:
        `torch.LongTensor` of shape `(N,)`: the chosen code of every row.
    """
    d = distances.detach().double()
    n, k = d.shape
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=d.device)
    if groups is None:
        single, order, lengths = True, None, torch.tensor([n], device=d.device)
    else:
        # rows sorted by group, so that per-group sums are contiguous segment reductions
        groups = groups.long()
        order = torch.argsort(groups, stable=True)
        d = d[order]
        lengths = torch.bincount(groups, minlength=int(groups.max()) + 1)  # (G,)
        row_group = groups[order]  # (N,), non-decreasing
        single = lengths.numel() == 1

    def expand(per_group: torch.Tensor) -> torch.Tensor:  # (G, ...) -> (N, ...)
        return per_group.expand(n, *per_group.shape[1:]) if single else per_group.index_select(0, row_group)

    def group_reduce(values: torch.Tensor, reduce: str) -> torch.Tensor:  # (N, ...) -> (G, ...)
        if single:
            return getattr(values, "amax" if reduce == "max" else "amin" if reduce == "min" else reduce)(0)[None]
        return torch.segment_reduce(values, reduce, lengths=lengths, axis=0)

    # centre and scale every group's distances to [-1, 1]
    group_max, group_min = group_reduce(d.amax(1), "max"), group_reduce(d.amin(1), "min")  # (G,)
    middle = (group_max + group_min) / 2
    half_range = ((group_max - group_min) / 2).clamp_min(1e-12)
    d = (d - expand(middle)[:, None]) / expand(half_range)[:, None]
    # Gibbs kernel, stabilised per row (a row factor is absorbed by that row's potential u): entries in (e^{-2/eps}, 1]
    kernel = torch.exp(-(d - d.amin(1, keepdim=True)) / epsilon)  # (N, K)
    rows_per_group = lengths.to(d.dtype)  # (G,)
    capacity = (rows_per_group / k).clamp_min(1.0)  # (G,) mass each code receives
    slack = capacity * k - rows_per_group  # (G,) slack-row mass, 0 when n >= K
    tiny, huge = 1e-300, 1e300
    v = torch.ones(lengths.numel(), k, dtype=d.dtype, device=d.device)  # (G, K) column potentials
    for _ in range(num_iters):
        row_mass = kernel @ v[0] if single else torch.einsum("nk,nk->n", kernel, expand(v))  # (N,)
        u = 1.0 / row_mass.clamp_min(tiny)
        u_slack = slack / v.sum(1).clamp_min(tiny)  # (G,); the slack row's kernel is all ones
        column_mass = (u @ kernel)[None] if single else group_reduce(kernel * u[:, None], "sum")  # (G, K)
        v = (capacity[:, None] / (column_mass + u_slack[:, None]).clamp_min(tiny)).clamp_max(huge)
    choice = (kernel * expand(v)).argmax(1)  # the plan up to the positive row factor u
    if order is None:
        return choice
    return torch.empty_like(choice).scatter_(0, order, choice)


def codebook_statistics(codes: torch.Tensor, codebook_size: int) -> dict:
    """Collision rate and per-level usage/perplexity of a code table.

    Args:
        codes (`torch.LongTensor` of shape `(N, num_quantizers)`): one code tuple per row.
        codebook_size (`int`): codes per level.

    Returns:
        `dict` with `num_rows`, `num_unique` (distinct tuples), `collision_rate` (`1 - num_unique / num_rows`, the
        LC-Rec definition), `usage` (per level, fraction of the codebook used) and `perplexity` (per level, exp of the
        entropy of the code distribution; `codebook_size` when uniform, 1 when collapsed).
    """
    codes = torch.as_tensor(codes).long()
    if codes.ndim != 2:
        raise ValueError(f"`codes` must have shape (N, num_quantizers), got shape {tuple(codes.shape)}.")
    n, levels = codes.shape
    if n == 0:
        return {
            "num_rows": 0,
            "num_unique": 0,
            "collision_rate": 0.0,
            "usage": [0.0] * levels,
            "perplexity": [0.0] * levels,
        }
    if int(codes.min()) < 0 or int(codes.max()) >= codebook_size:
        raise ValueError(
            f"`codes` must lie in [0, {codebook_size}), got values in [{int(codes.min())}, {int(codes.max())}]."
        )
    num_unique = int(torch.unique(_row_keys(codes, codebook_size)).numel())
    usage, perplexity = [], []
    for level in range(levels):
        counts = torch.bincount(codes[:, level], minlength=codebook_size).double()
        p = counts / n
        entropy = -(p[p > 0] * p[p > 0].log()).sum()
        usage.append(float((counts > 0).double().mean()))
        perplexity.append(float(entropy.exp()))
    return {
        "num_rows": n,
        "num_unique": num_unique,
        "collision_rate": 1.0 - num_unique / n,
        "usage": usage,
        "perplexity": perplexity,
    }


def _row_keys(codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """One int64 key per row, equal exactly for equal code tuples."""
    levels = codes.shape[1]
    if codebook_size**levels < 2**62:
        powers = torch.tensor([codebook_size ** (levels - 1 - i) for i in range(levels)], device=codes.device)
        return (codes * powers).sum(1)
    return torch.unique(codes, dim=0, return_inverse=True)[1]


def _prefix_key(codes: list[int], codebook_size: int) -> int:
    """A code prefix read as a base-`codebook_size` number (the same value as `_row_keys` gives)."""
    key = 0
    for code in codes:
        key = key * codebook_size + code
    return key


# outputs


@dataclass
class RQVAEOutput(ModelOutput):
    r"""
    Output of [`RQVAEModel.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`):
            `reconstruction_loss + quantization_loss`.
        reconstruction_loss (`torch.FloatTensor` of shape `()`):
            Mean squared error between the reconstruction and the input embeddings.
        quantization_loss (`torch.FloatTensor` of shape `()`):
            Mean over levels of `codebook MSE + commitment_weight * commitment MSE`.
        reconstruction (`torch.FloatTensor` of shape `(batch_size, input_dim)`):
            Decoder output.
        latent (`torch.FloatTensor` of shape `(batch_size, code_dim)`):
            Encoder output before quantization.
        quantized (`torch.FloatTensor` of shape `(batch_size, code_dim)`):
            Sum of the chosen code vectors (straight-through: gradients pass to `latent`).
        codes (`torch.LongTensor` of shape `(batch_size, num_quantizers)`):
            Chosen code per level.
    """

    loss: torch.FloatTensor | None = None
    reconstruction_loss: torch.FloatTensor | None = None
    quantization_loss: torch.FloatTensor | None = None
    reconstruction: torch.FloatTensor | None = None
    latent: torch.FloatTensor | None = None
    quantized: torch.FloatTensor | None = None
    codes: torch.LongTensor | None = None


# modules


class RQVAEMLP(nn.Module):
    """Linear layers of the given widths; ReLU (after optional BatchNorm) and dropout between them, none at the end."""

    def __init__(self, sizes: list[int], dropout: float, use_batch_norm: bool):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.norms = nn.ModuleList(nn.BatchNorm1d(b) if use_batch_norm else nn.Identity() for b in sizes[1:-1])
        self.activation = nn.ReLU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            hidden_states = layer(hidden_states)
            if i < len(self.norms):
                hidden_states = self.dropout(self.activation(self.norms[i](hidden_states)))
        return hidden_states


class RQVAEVectorQuantizer(nn.Module):
    """One residual level: a `(codebook_size, code_dim)` codebook and a flag saying whether it was initialised."""

    def __init__(self, codebook_size: int, code_dim: int):
        super().__init__()
        self.codebook = nn.Parameter(torch.empty(codebook_size, code_dim))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def distances(self, residual: torch.Tensor) -> torch.Tensor:
        """Squared distances `(N, codebook_size)` from residuals `(N, code_dim)` to every code (no gradient)."""
        return _squared_distances(residual.detach(), self.codebook.detach())

    @torch.no_grad()
    def init_codebook_(self, residuals: torch.Tensor, num_iters: int, generator: torch.Generator | None = None):
        """Set the codebook to the k-means centroids of `residuals` and mark it initialised."""
        centroids = kmeans(residuals, self.codebook.shape[0], num_iters, generator=generator)
        self.codebook.copy_(centroids.to(self.codebook.dtype))
        self.initialized.fill_(True)


# models


class RQVAEPreTrainedModel(PreTrainedModel):
    """Weight initialisation and loading for [`RQVAEModel`]."""

    config_class = RQVAEConfig
    base_model_prefix = "rqvae"
    main_input_name = "embeddings"
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module):
        """Kaiming-uniform (ReLU gain) linear weights and zero biases, so the deep MLP keeps its scale; codebooks
        `normal(0, initializer_range)` and not initialised (k-means replaces them); standard BatchNorm init."""
        if isinstance(module, nn.Linear):
            init.kaiming_uniform_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, RQVAEVectorQuantizer):
            init.normal_(module.codebook, mean=0.0, std=self.config.initializer_range)
            init.zeros_(module.initialized)
        elif isinstance(module, nn.BatchNorm1d):
            super()._init_weights(module)


class RQVAEModel(RQVAEPreTrainedModel):
    r"""
    Residual-quantized VAE that maps location embeddings to `num_quantizers` discrete codes (QT-Mob location tokens).

    Training (`forward`) returns `loss = MSE(reconstruction, embeddings) + mean_l(||sg[r_l] - e_l||² +
    β ||r_l - sg[e_l]||²)` with a straight-through estimator; on the last level the assignment is Sinkhorn-balanced
    over the batch when `config.sinkhorn_last_level`. Codebooks are k-means initialised from the first training batch
    unless [`~RQVAEModel.kmeans_init`] was called first.

    Example:

    ```python
    >>> import torch
    >>> from modeling_mobility.rqvae import RQVAEConfig, RQVAEModel

    >>> model = RQVAEModel(RQVAEConfig(input_dim=16, hidden_sizes=[32], code_dim=8, num_quantizers=3, codebook_size=8))
    >>> embeddings = torch.randn(200, 16)
    >>> model.kmeans_init(embeddings)
    >>> model(embeddings).loss.shape
    torch.Size([])
    >>> codes, report = model.get_unique_codes(embeddings)
    >>> codes.shape, report["collision_rate_final"]
    (torch.Size([200, 3]), 0.0)
    ```
    """

    def __init__(self, config: RQVAEConfig):
        super().__init__(config)
        widths = [config.input_dim, *config.hidden_sizes, config.code_dim]
        self.encoder = RQVAEMLP(widths, config.dropout, config.use_batch_norm)
        self.quantizers = nn.ModuleList(
            RQVAEVectorQuantizer(config.codebook_size, config.code_dim) for _ in range(config.num_quantizers)
        )
        self.decoder = RQVAEMLP(widths[::-1], config.dropout, config.use_batch_norm)
        self.post_init()

    # input checks and no-grad helpers

    def _check_embeddings(self, embeddings, name: str = "embeddings") -> torch.Tensor:
        embeddings = torch.as_tensor(embeddings)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.config.input_dim:
            raise ValueError(
                f"`{name}` must have shape (N, {self.config.input_dim}) (config.input_dim), got shape "
                f"{tuple(embeddings.shape)}."
            )
        if not embeddings.is_floating_point():
            embeddings = embeddings.float()
        return embeddings.to(device=self.device, dtype=self.encoder.layers[0].weight.dtype)

    @property
    def codebooks(self) -> torch.Tensor:
        """All codebooks stacked, `(num_quantizers, codebook_size, code_dim)` (a detached copy)."""
        return torch.stack([q.codebook.detach() for q in self.quantizers])

    @torch.no_grad()
    def _encode(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Latents `(N, code_dim)` in chunks, in the model's current mode."""
        if embeddings.shape[0] == 0:
            return embeddings.new_zeros(0, self.config.code_dim)
        return torch.cat([self.encoder(chunk) for chunk in embeddings.split(_CHUNK)])

    @torch.no_grad()
    def _assign(self, latent: torch.Tensor, use_sinkhorn: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes `(N, L)` and the last level's residuals `(N, code_dim)`; nearest code per level, Sinkhorn on the
        last level when asked."""
        residual = latent
        codes = []
        last = self.config.num_quantizers - 1
        for level, quantizer in enumerate(self.quantizers):
            if level == last and use_sinkhorn and self.config.sinkhorn_iterations > 0:
                distances = torch.cat([quantizer.distances(chunk) for chunk in residual.split(_CHUNK)])
                idx = sinkhorn_assign(distances, self.config.sinkhorn_epsilon, self.config.sinkhorn_iterations)
            else:
                idx = torch.cat([quantizer.distances(chunk).argmin(1) for chunk in residual.split(_CHUNK)])
            codes.append(idx)
            if level < last:
                residual = residual - quantizer.codebook[idx]
        return torch.stack(codes, 1), residual

    @contextmanager
    def _eval_mode(self):
        """Eval mode inside (no dropout, BatchNorm running statistics); the previous mode is restored after."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    # forward

    def forward(
        self,
        embeddings: torch.FloatTensor,
        return_loss: bool = True,
        return_dict: bool | None = None,
    ) -> RQVAEOutput | tuple:
        r"""
        Encode, quantize and reconstruct a batch of location embeddings.

        Args:
            embeddings (`torch.FloatTensor` of shape `(batch_size, input_dim)`):
                Semantic embeddings of the locations.
            return_loss (`bool`, *optional*, defaults to `True`):
                Whether to compute the losses (the embeddings are their own target, so `Trainer` needs no labels).
            return_dict (`bool`, *optional*):
                Whether to return an [`RQVAEOutput`] instead of a plain tuple (default: `config.return_dict`).

        Returns:
            [`RQVAEOutput`] (or a tuple of its non-`None` fields).
        """
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.config.input_dim:
            raise ValueError(
                f"`embeddings` must have shape (batch_size, {self.config.input_dim}) (config.input_dim), got shape "
                f"{tuple(embeddings.shape)}."
            )

        # encode
        latent = self.encoder(embeddings)  # (B, code_dim)

        # quantize level by level: level l quantizes what levels < l left over
        residual = latent
        code_sum = torch.zeros_like(latent)
        codes, level_losses = [], []
        last = self.config.num_quantizers - 1
        use_sinkhorn = self.training and self.config.sinkhorn_last_level and self.config.sinkhorn_iterations > 0
        for level, quantizer in enumerate(self.quantizers):
            if self.training and not bool(quantizer.initialized):
                # k-means initialisation from the first batch of this level's residuals (QT-Mob / LC-Rec)
                quantizer.init_codebook_(residual.detach(), self.config.kmeans_iterations)
            distances = quantizer.distances(residual)  # (B, K)
            if level == last and use_sinkhorn:
                idx = sinkhorn_assign(distances, self.config.sinkhorn_epsilon, self.config.sinkhorn_iterations)
            else:
                idx = distances.argmin(1)
            # (B, code_dim), differentiable w.r.t. the codebook; a one-hot matmul rather than `codebook[idx]`, whose
            # backward (an accumulating scatter) is not run-to-run reproducible on multi-threaded CPUs
            code_vectors = F.one_hot(idx, self.config.codebook_size).to(quantizer.codebook.dtype) @ quantizer.codebook
            if return_loss:
                codebook_loss = F.mse_loss(code_vectors, residual.detach())
                commitment_loss = F.mse_loss(residual, code_vectors.detach())
                level_losses.append(codebook_loss + self.config.commitment_weight * commitment_loss)
            codes.append(idx)
            code_sum = code_sum + code_vectors.detach()
            # the next level sees the remainder; it keeps the encoder's gradient so its commitment term trains it
            residual = residual - code_vectors.detach()

        # straight-through estimator: the forward value is the code sum, the gradient goes to the latent
        quantized = latent + (code_sum - latent).detach()

        # decode
        reconstruction = self.decoder(quantized)

        loss = reconstruction_loss = quantization_loss = None
        if return_loss:
            reconstruction_loss = F.mse_loss(reconstruction, embeddings)
            quantization_loss = torch.stack(level_losses).mean()
            loss = reconstruction_loss + quantization_loss

        output = RQVAEOutput(
            loss=loss,
            reconstruction_loss=reconstruction_loss,
            quantization_loss=quantization_loss,
            reconstruction=reconstruction,
            latent=latent,
            quantized=quantized,
            codes=torch.stack(codes, 1),
        )
        return output if return_dict else output.to_tuple()

    # codebook maintenance

    @torch.no_grad()
    def kmeans_init(self, embeddings: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Initialise every codebook with k-means++ on its level's residuals of `embeddings`.

        Level 0 clusters the latents, level l the remainders after levels < l. The encoder runs in the model's current
        mode (as on the first training batch in the paper code). Deterministic given `generator` (or the torch seed).

        Args:
            embeddings (`torch.Tensor` of shape `(N, input_dim)`): a sample of the training embeddings (N should be
                well above `codebook_size`; the paper uses the first batch of 1024).
            generator (`torch.Generator`, *optional*): random source for the seeding.
        """
        embeddings = self._check_embeddings(embeddings)
        if embeddings.shape[0] < self.config.codebook_size:
            logger.warning_once(
                f"kmeans_init got {embeddings.shape[0]} rows for {self.config.codebook_size} codes per level; "
                "spare codes are jittered copies of samples."
            )
        residual = self._encode(embeddings)
        for quantizer in self.quantizers:
            quantizer.init_codebook_(residual, self.config.kmeans_iterations, generator=generator)
            idx = quantizer.distances(residual).argmin(1)
            residual = residual - quantizer.codebook[idx]

    @torch.no_grad()
    def code_counts(self, embeddings: torch.Tensor, use_sinkhorn: bool | None = False) -> torch.LongTensor:
        """How many rows of `embeddings` take each code, `(num_quantizers, codebook_size)`."""
        codes = self.get_codes(embeddings, use_sinkhorn=use_sinkhorn)
        counts = torch.zeros(self.config.num_quantizers, self.config.codebook_size, dtype=torch.long)
        for level in range(self.config.num_quantizers):
            counts[level] = torch.bincount(codes[:, level].cpu(), minlength=self.config.codebook_size)
        return counts

    @torch.no_grad()
    def reseed_dead_codes(
        self,
        embeddings: torch.Tensor,
        counts: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> list[int]:
        """Replace every code used fewer than `config.dead_code_threshold` times by a random residual of its level.

        Levels are processed in order, so level l draws from the residuals left by the (already re-seeded) levels < l.
        Used codes are left untouched. Deterministic given `generator` (or the torch seed).

        Args:
            embeddings (`torch.Tensor` of shape `(N, input_dim)`): rows to draw the new codes from (e.g. a sample of
                the training set).
            counts (`torch.LongTensor` of shape `(num_quantizers, codebook_size)`, *optional*): usage of every code
                (e.g. over the last epoch). Recomputed on `embeddings` with nearest-code assignment when `None`.
            generator (`torch.Generator`, *optional*): random source.

        Returns:
            `list[int]`: the number of re-seeded codes per level.
        """
        config = self.config
        embeddings = self._check_embeddings(embeddings)
        shape = (config.num_quantizers, config.codebook_size)
        if counts is None:
            counts = self.code_counts(embeddings)
        counts = torch.as_tensor(counts)
        if tuple(counts.shape) != shape:
            raise ValueError(
                f"`counts` must have shape {shape} (num_quantizers, codebook_size), got {tuple(counts.shape)}."
            )
        reseeded = [0] * config.num_quantizers
        if config.dead_code_threshold == 0 or embeddings.shape[0] == 0:
            return reseeded
        with self._eval_mode():
            residual = self._encode(embeddings)
        n = residual.shape[0]
        for level, quantizer in enumerate(self.quantizers):
            dead = (counts[level] < config.dead_code_threshold).nonzero().flatten().to(residual.device)
            if dead.numel() > 0:
                if n >= dead.numel():
                    rows = torch.randperm(n, generator=generator, device=residual.device)[: dead.numel()]
                else:
                    rows = torch.randint(n, (dead.numel(),), generator=generator, device=residual.device)
                quantizer.codebook[dead] = residual[rows].to(quantizer.codebook.dtype)
                reseeded[level] = int(dead.numel())
            idx = quantizer.distances(residual).argmin(1)
            residual = residual - quantizer.codebook[idx]
        return reseeded

    # codes

    @torch.no_grad()
    def get_codes(self, embeddings: torch.Tensor, use_sinkhorn: bool | None = None) -> torch.LongTensor:
        """Code tuples of `embeddings`, `(N, num_quantizers)`, computed in eval mode.

        Every level takes the nearest code of its residual. With `use_sinkhorn` (default:
        `config.sinkhorn_last_level`), the last level instead solves a Sinkhorn-balanced assignment over all the rows
        given (see [`sinkhorn_assign`]: distances centred and scaled to [-1, 1], `config.sinkhorn_iterations`
        Sinkhorn-Knopp iterations with `config.sinkhorn_epsilon`, then the arg-max of the plan), which spreads rows
        over the codes and so reduces collisions; the result then depends on the set of rows passed together. For a
        small set (fewer rows than codes) it reduces to a soft one-to-one matching, close to the nearest code.

        Args:
            embeddings (`torch.Tensor` of shape `(N, input_dim)`): location embeddings.
            use_sinkhorn (`bool`, *optional*): balance the last level; defaults to `config.sinkhorn_last_level`.

        Returns:
            `torch.LongTensor` of shape `(N, num_quantizers)`.
        """
        if use_sinkhorn is None:
            use_sinkhorn = self.config.sinkhorn_last_level
        embeddings = self._check_embeddings(embeddings)
        with self._eval_mode():
            latent = self._encode(embeddings)
            codes, _ = self._assign(latent, use_sinkhorn)
        return codes

    @torch.no_grad()
    def get_unique_codes(self, embeddings: torch.Tensor) -> tuple[torch.LongTensor, dict]:
        """A distinct code tuple for every row of `embeddings`, deterministically, with a report.

        1. Nearest code per level (arg-min), as at inference.
        2. Every last-level bucket (rows sharing the first `num_quantizers - 1` codes) that holds a collision is
           re-assigned on its last level by [`sinkhorn_assign`] within the bucket: a soft one-to-one matching when the
           bucket has fewer rows than codes, the paper's balanced assignment otherwise (QT-Mob re-quantises colliding
           groups with Sinkhorn).
        3. Rows that still collide are moved one by one: in each colliding group the row nearest to the code keeps it;
           the others, in order of (code tuple, distance, row index), take the nearest free last-level code under the
           same prefix; when that bucket is full they move to the next-nearest code with room one level up (and so
           on), and then descend greedily through the nearest codes with room.

        Args:
            embeddings (`torch.Tensor` of shape `(N, input_dim)`): all locations to be coded together.

        Returns:
            `tuple[torch.LongTensor, dict]`: codes `(N, num_quantizers)` and a report with `num_rows`,
            `collision_rate_before` (nearest codes), `collision_rate_after_sinkhorn`, `collision_rate_final` (0.0),
            `num_sinkhorn_changed`, `num_moved`, and per-level `usage` and `perplexity` of the final codes.

        Raises:
            `ValueError`: when `N > codebook_size ** num_quantizers`.
        """
        config = self.config
        levels, k = config.num_quantizers, config.codebook_size
        embeddings = self._check_embeddings(embeddings)
        n = embeddings.shape[0]
        if n > k**levels:
            raise ValueError(
                f"`embeddings` has {n} rows but at most codebook_size ** num_quantizers = {k}**{levels} = "
                f"{k**levels} distinct codes exist; use more levels or a larger codebook."
            )
        with self._eval_mode():
            latent = self._encode(embeddings)
            codes, last_residual = self._assign(latent, use_sinkhorn=False)
        before = codebook_statistics(codes, k)["collision_rate"] if n else 0.0

        # 2. Sinkhorn within the last-level buckets that hold a collision
        keys = _row_keys(codes, k)
        _, group_of_row, group_sizes = torch.unique(keys, return_inverse=True, return_counts=True)
        num_changed = 0
        if bool((group_sizes > 1).any()) and config.sinkhorn_iterations > 0:
            prefix_keys = _row_keys(codes[:, :-1], k) if levels > 1 else torch.zeros_like(keys)
            colliding_prefixes = torch.unique(prefix_keys[group_sizes[group_of_row] > 1])
            rows = torch.isin(prefix_keys, colliding_prefixes).nonzero().flatten()
            _, bucket = torch.unique(prefix_keys[rows], return_inverse=True)
            distances = self.quantizers[-1].distances(last_residual[rows])
            new_last = sinkhorn_assign(distances, config.sinkhorn_epsilon, config.sinkhorn_iterations, groups=bucket)
            num_changed = int((new_last != codes[rows, -1]).sum())
            codes[rows, -1] = new_last
            keys = _row_keys(codes, k)
            _, group_of_row, group_sizes = torch.unique(keys, return_inverse=True, return_counts=True)
        after_sinkhorn = 1.0 - group_sizes.numel() / n if n else 0.0

        # 3. deterministic greedy moves for what still collides
        num_moved = 0
        if bool((group_sizes > 1).any()):
            codes, num_moved = self._disambiguate(codes, keys, latent, last_residual)

        report = codebook_statistics(codes, k)
        if report["collision_rate"] != 0.0:
            raise RuntimeError("get_unique_codes left a collision; please report this as a bug.")
        return codes, {
            "num_rows": n,
            "collision_rate_before": before,
            "collision_rate_after_sinkhorn": after_sinkhorn,
            "collision_rate_final": report["collision_rate"],
            "num_sinkhorn_changed": num_changed,
            "num_moved": num_moved,
            "usage": report["usage"],
            "perplexity": report["perplexity"],
        }

    def _disambiguate(
        self, codes: torch.Tensor, keys: torch.Tensor, latent: torch.Tensor, last_residual: torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        """Step 3 of `get_unique_codes`: move all but one row of every colliding group to free codes."""
        levels, k = self.config.num_quantizers, self.config.codebook_size
        n = codes.shape[0]
        codebooks = self.codebooks.to(latent.dtype)  # (L, K, D)
        # residual of the last level w.r.t. the row's current code orders the members of a group
        code_distance = (last_residual - codebooks[-1][codes[:, -1]]).pow(2).sum(1)  # (N,)
        # order rows by (key, distance, row): successive stable sorts, least significant first
        order = torch.arange(n, device=codes.device)
        order = order[torch.sort(code_distance[order], stable=True).indices]
        order = order[torch.sort(keys[order], stable=True).indices]
        sorted_keys = keys[order]
        first_of_group = torch.ones(n, dtype=torch.bool, device=codes.device)
        first_of_group[1:] = sorted_keys[1:] != sorted_keys[:-1]
        moved = order[~first_of_group]  # rows to move, in processing order
        kept = order[first_of_group]

        # occupancy[l][key of a prefix of length l] = rows placed under that prefix, of capacity k ** (levels - l);
        # a prefix's key is its codes read as a base-k number (Python ints, so any size works)
        occupancy: list[dict[int, int]] = [{0: int(kept.numel())}]
        kept_codes = codes[kept]
        for length in range(1, levels + 1):
            if k**length < 2**62:
                prefix_keys, counts = torch.unique(_row_keys(kept_codes[:, :length], k), return_counts=True)
                occupancy.append(dict(zip(prefix_keys.tolist(), counts.tolist())))
            else:
                level_counts: dict[int, int] = {}
                for row_codes in kept_codes[:, :length].tolist():
                    key = _prefix_key(row_codes, k)
                    level_counts[key] = level_counts.get(key, 0) + 1
                occupancy.append(level_counts)
        capacity = [k ** (levels - length) for length in range(levels + 1)]

        def has_room(length: int, key: int) -> bool:
            return occupancy[length].get(key, 0) < capacity[length]

        def nearest_first(residual: torch.Tensor, level: int) -> list[int]:
            return (codebooks[level] - residual).pow(2).sum(1).argsort(stable=True).tolist()

        # the common case, a free code under the same prefix: last-level orders for all moved rows at once
        moved_codes = codes[moved].tolist()
        last_orders = _squared_distances(last_residual[moved], codebooks[-1]).argsort(dim=1, stable=True).tolist()
        new_codes = codes.clone()
        for position, row in enumerate(moved.tolist()):
            current = moved_codes[position]
            placed = None
            for depth in range(levels - 1, -1, -1):
                prefix_key = _prefix_key(current[:depth], k)
                if not has_room(depth, prefix_key):
                    continue  # this whole subtree is full: go one level up
                if depth == levels - 1:
                    candidates, residual = last_orders[position], None
                else:
                    residual = latent[row].clone()
                    for level in range(depth):
                        residual -= codebooks[level][current[level]]
                    candidates = nearest_first(residual, depth)
                # a prefix with room has a child with room, so this always places the row
                code = next(c for c in candidates if has_room(depth + 1, prefix_key * k + c))
                placed, key = [*current[:depth], code], prefix_key * k + code
                # descend through the nearest codes with room
                for level in range(depth + 1, levels):
                    residual = residual - codebooks[level - 1][placed[-1]]
                    code = next(c for c in nearest_first(residual, level) if has_room(level + 1, key * k + c))
                    placed.append(code)
                    key = key * k + code
                break
            if placed is None:  # unreachable while n <= k ** levels
                raise RuntimeError("no free code left; please report this as a bug.")
            key = 0
            occupancy[0][0] += 1
            for length in range(1, levels + 1):
                key = key * k + placed[length - 1]
                occupancy[length][key] = occupancy[length].get(key, 0) + 1
            new_codes[row] = torch.tensor(placed, dtype=codes.dtype)
        return new_codes, int(moved.numel())

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.FloatTensor:
        """Reconstruct embeddings from code tuples: the sum of the code vectors through the decoder (eval mode).

        Args:
            codes (`torch.LongTensor` of shape `(N, num_quantizers)`): code tuples.

        Returns:
            `torch.FloatTensor` of shape `(N, input_dim)`.
        """
        config = self.config
        codes = torch.as_tensor(codes)
        if codes.ndim != 2 or codes.shape[1] != config.num_quantizers:
            raise ValueError(
                f"`codes` must have shape (N, {config.num_quantizers}) (config.num_quantizers), got "
                f"shape {tuple(codes.shape)}."
            )
        codes = codes.long().to(self.device)
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= config.codebook_size):
            raise ValueError(
                f"`codes` must lie in [0, {config.codebook_size}) (config.codebook_size), got values in "
                f"[{int(codes.min())}, {int(codes.max())}]."
            )
        quantized = sum(quantizer.codebook[codes[:, level]] for level, quantizer in enumerate(self.quantizers))
        with self._eval_mode():
            return self.decoder(quantized)
