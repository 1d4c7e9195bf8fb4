"""Train the RQ-VAE location quantizer of QT-Mob (DESIGN §5.1 step 3) with `transformers.Trainer`.

The quantizer turns each location's semantic embedding into `num_quantizers` codes (its location tokens). Training
initialises every codebook with k-means on a sample of the training embeddings, then minimises reconstruction +
quantization loss with AdamW, re-seeds dead codes at the end of every epoch, evaluates on held-out rows (loss,
reconstruction loss, collision rate of the nearest codes, codebook usage) and stops early; the best checkpoint is
restored. Model selection uses, by default, `eval_loss * (1 + eval_collision_rate)` (DESIGN: "early stopping on
reconstruction + collision rate"; scale-free, so no weight to tune): on clustered data the loss can keep falling
slowly while the codes of near-identical locations merge, and the loss alone then runs to the epoch budget and picks a
model with more collisions. `selection_metric="loss"` selects on the evaluation loss alone. The paper trains 10,000
epochs; early stopping needs about a hundred.

Example (copy-paste; 384-d embeddings, e.g. all-MiniLM-L6-v2 of the location descriptions):

```python
import numpy as np
import torch

from modeling_mobility.rqvae import RQVAEConfig
from train.rqvae import codebook_report, train_rqvae

embeddings = np.load("location_embeddings.npy")  # (num_locations, 384), float32
result = train_rqvae(embeddings, RQVAEConfig(input_dim=embeddings.shape[1]), output_dir="runs/rqvae")
codes, report = result.model.get_unique_codes(torch.from_numpy(embeddings))  # one distinct code tuple per location
print(result.best_epoch, report["collision_rate_before"], codebook_report(codes, result.model.config.codebook_size))
# loads back anywhere with AutoModel.from_pretrained("runs/rqvae/model", trust_remote_code=True)
result.model.save_pretrained("runs/rqvae/model")
```

The same runs under `accelerate launch` (Trainer handles devices); the `mobility train location-tokenizer` command
wraps it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import EarlyStoppingCallback, PrinterCallback, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.utils import logging as hf_logging

from modeling_mobility.rqvae import RQVAEConfig, RQVAEModel
from modeling_mobility.rqvae.modeling_rqvae import codebook_statistics

__all__ = ["EmbeddingDataset", "RQVAETrainingCallback", "RQVAETrainingResult", "codebook_report", "train_rqvae"]

logger = logging.getLogger(__name__)

# Rows used for the k-means initialisation and for counting code usage before re-seeding dead codes.
_SAMPLE_ROWS = 16384
_SELECTION_METRICS = ("objective", "loss", "collision_rate")


class EmbeddingDataset(torch.utils.data.Dataset):
    """Rows of an embedding matrix as `{"embeddings": FloatTensor(input_dim)}` examples for `Trainer`."""

    def __init__(self, embeddings: torch.Tensor):
        self.embeddings = embeddings

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"embeddings": self.embeddings[index]}


@dataclass
class RQVAETrainingResult:
    """What [`train_rqvae`] returns.

    Args:
        model (`RQVAEModel`): the best model (lowest evaluation loss), in eval mode.
        history (`list[dict]`): one entry per evaluation (epoch 0 is the k-means-initialised model, then one per
            epoch): `epoch`, `global_step`, `train_loss`, `eval_loss`, `eval_reconstruction_loss`,
            `eval_quantization_loss`, `eval_collision_rate` (nearest codes of the evaluation rows), `eval_objective`,
            per-level `usage` and `perplexity` on the evaluation rows, and `reseeded` (dead codes re-seeded per level
            at the end of that epoch).
        best_epoch (`int`): epoch of the restored model (1-based).
        stopped_early (`bool`): whether early stopping ended training before `max_epochs`.
    """

    model: RQVAEModel
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False


def codebook_report(codes: torch.Tensor | np.ndarray, codebook_size: int) -> dict:
    """Collision rate and per-level usage/perplexity of a code table (the statistics `get_unique_codes` reports).

    Args:
        codes (`torch.LongTensor` or `np.ndarray` of shape `(N, num_quantizers)`): one code tuple per location.
        codebook_size (`int`): codes per level.

    Returns:
        `dict` with `num_rows`, `num_unique`, `collision_rate` (`1 - num_unique / num_rows`), and per level `usage`
        (fraction of the codebook used) and `perplexity` (exp of the entropy of the code distribution).
    """
    if isinstance(codebook_size, bool) or not isinstance(codebook_size, (int, np.integer)) or codebook_size < 1:
        raise ValueError(f"`codebook_size` must be a positive integer, got {codebook_size!r}.")
    return codebook_statistics(
        torch.as_tensor(np.asarray(codes) if not torch.is_tensor(codes) else codes), int(codebook_size)
    )


class RQVAETrainingCallback(TrainerCallback):
    """Dead-code re-seeding at epoch ends and RQ-VAE evaluation metrics.

    A forward hook counts the codes the training batches take during an epoch; at the end of the epoch, codes taken
    fewer than `config.dead_code_threshold` times are re-seeded with random residuals of rows of `train_sample`. At
    every evaluation it adds `eval_reconstruction_loss`, `eval_quantization_loss`, `eval_collision_rate` and
    `eval_objective = eval_loss * (1 + eval_collision_rate)` to the metrics, so they can drive model selection, and
    appends an entry to `history`. Place it before `EarlyStoppingCallback`.

    Args:
        train_sample (`torch.Tensor` of shape `(N, input_dim)`): training rows the re-seeded codes are drawn from.
        eval_embeddings (`torch.Tensor` of shape `(M, input_dim)`): rows the metrics are computed on.
        seed (`int`): seed of the re-seeding generator.
    """

    def __init__(self, train_sample: torch.Tensor, eval_embeddings: torch.Tensor, seed: int = 0):
        self.train_sample = train_sample
        self.eval_embeddings = eval_embeddings
        self.generator = torch.Generator().manual_seed(seed)
        self.history: list[dict] = []
        self._train_loss: float | None = None
        self._reseeded: list[int] | None = None
        self._usage: torch.Tensor | None = None
        self._hook = None

    def _count_codes(self, module, args, output):
        if module.training and output is not None and getattr(output, "codes", None) is not None:
            codes = output.codes.detach()
            if self._usage is None:
                config = module.config
                self._usage = torch.zeros(
                    config.num_quantizers, config.codebook_size, dtype=torch.long, device=codes.device
                )
            self._usage.scatter_add_(1, codes.t(), torch.ones_like(codes.t()))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and self._hook is None:
            self._hook = model.register_forward_hook(self._count_codes)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        return control

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        usage, self._usage = self._usage, None
        if model is None or usage is None or model.config.dead_code_threshold == 0:
            return control
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every process must re-seed the same codes (same generator, same rows), so they count all batches
            torch.distributed.all_reduce(usage)
        num_dead = int((usage < model.config.dead_code_threshold).sum())
        self._reseeded = [0] * model.config.num_quantizers
        if num_dead:
            # new codes are residuals of random training rows: a random subset is enough and cheap to encode
            rows = torch.randperm(self.train_sample.shape[0], generator=self.generator)
            rows = rows[: max(1024, 4 * num_dead)]
            device_generator = self.generator
            if model.device.type != "cpu":  # a CPU generator cannot drive GPU sampling
                device_generator = torch.Generator(model.device).manual_seed(
                    int(torch.randint(2**31 - 1, (1,), generator=self.generator))
                )
            self._reseeded = model.reseed_dead_codes(self.train_sample[rows], usage, generator=device_generator)
            logger.debug("epoch %s: re-seeded %s dead codes per level", state.epoch, self._reseeded)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self._train_loss = float(logs["loss"])
        return control

    @torch.no_grad()
    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        if model is None or metrics is None:
            return control
        was_training = model.training
        model.eval()
        try:
            output = model(self.eval_embeddings.to(model.device))
            codes = model.get_codes(self.eval_embeddings, use_sinkhorn=False)
        finally:
            model.train(was_training)
        stats = codebook_statistics(codes.cpu(), model.config.codebook_size)
        eval_loss = float(metrics.get("eval_loss", float(output.loss)))
        metrics["eval_reconstruction_loss"] = float(output.reconstruction_loss)
        metrics["eval_quantization_loss"] = float(output.quantization_loss)
        metrics["eval_collision_rate"] = stats["collision_rate"]
        metrics["eval_objective"] = eval_loss * (1.0 + stats["collision_rate"])
        self.history.append(
            {
                "epoch": int(round(state.epoch or 0)),
                "global_step": int(state.global_step),
                "train_loss": self._train_loss if state.global_step else None,
                "eval_loss": eval_loss,
                "eval_reconstruction_loss": metrics["eval_reconstruction_loss"],
                "eval_quantization_loss": metrics["eval_quantization_loss"],
                "eval_collision_rate": stats["collision_rate"],
                "eval_objective": metrics["eval_objective"],
                "usage": stats["usage"],
                "perplexity": stats["perplexity"],
                "reseeded": self._reseeded or [0] * model.config.num_quantizers,
            }
        )
        self._reseeded = None
        return control


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    return int(value)


def train_rqvae(
    embeddings: np.ndarray | torch.Tensor,
    config: RQVAEConfig | None = None,
    *,
    output_dir: str | os.PathLike,
    max_epochs: int = 200,
    batch_size: int = 1024,
    learning_rate: float = 1e-3,
    weight_decay: float = 1e-4,
    validation_fraction: float = 0.1,
    patience: int = 10,
    seed: int = 0,
    progress: bool = True,
    selection_metric: str = "objective",
) -> RQVAETrainingResult:
    """Train an [`RQVAEModel`] on location embeddings with `transformers.Trainer` and early stopping.

    Args:
        embeddings (`np.ndarray` or `torch.Tensor` of shape `(num_locations, input_dim)`): semantic embeddings.
        config (`RQVAEConfig`, *optional*): architecture; defaults to `RQVAEConfig(input_dim=embeddings.shape[1])`.
        output_dir (`str` or `os.PathLike`): where Trainer writes its checkpoints (safetensors, at most two kept).
        max_epochs (`int`, *optional*, defaults to 200): epoch budget.
        batch_size (`int`, *optional*, defaults to 1024): rows per step (the paper's batch size).
        learning_rate (`float`, *optional*, defaults to 1e-3): AdamW learning rate (paper: 1e-3).
        weight_decay (`float`, *optional*, defaults to 1e-4): AdamW weight decay (paper: 1e-4).
        validation_fraction (`float`, *optional*, defaults to 0.1): share of rows held out for evaluation and early
            stopping; with 0 the training rows are evaluated instead.
        patience (`int`, *optional*, defaults to 10): epochs without a lower evaluation loss before stopping.
        seed (`int`, *optional*, defaults to 0): seed of the split, k-means, re-seeding and Trainer.
        progress (`bool`, *optional*, defaults to `True`): show Trainer's progress bar.
        selection_metric (`str`, *optional*, defaults to `"objective"`): what early stopping and the restored model
            minimise: `"objective"` (`eval_loss * (1 + eval_collision_rate)`, the collision rate of the nearest codes
            of the evaluation rows), `"loss"` (evaluation loss) or `"collision_rate"`.

    Returns:
        [`RQVAETrainingResult`].
    """
    embeddings = torch.as_tensor(np.asarray(embeddings) if not torch.is_tensor(embeddings) else embeddings)
    if embeddings.ndim != 2 or embeddings.shape[0] == 0:
        raise ValueError(
            f"`embeddings` must be a non-empty 2-D array (num_locations, dim), got shape {tuple(embeddings.shape)}."
        )
    embeddings = embeddings.float().contiguous()
    if not bool(torch.isfinite(embeddings).all()):
        raise ValueError("`embeddings` contains NaN or infinite values.")
    if config is None:
        config = RQVAEConfig(input_dim=int(embeddings.shape[1]))
    if config.input_dim != embeddings.shape[1]:
        raise ValueError(
            f"`config.input_dim` ({config.input_dim}) must equal the embedding size ({embeddings.shape[1]})."
        )
    max_epochs = _check_positive_int("max_epochs", max_epochs)
    batch_size = _check_positive_int("batch_size", batch_size)
    patience = _check_positive_int("patience", patience)
    if selection_metric not in _SELECTION_METRICS:
        raise ValueError(f"`selection_metric` must be one of {list(_SELECTION_METRICS)}, got {selection_metric!r}.")
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"`validation_fraction` must be in [0, 1), got {validation_fraction!r}.")

    # split
    n = embeddings.shape[0]
    permutation = torch.from_numpy(np.random.default_rng(seed).permutation(n))
    num_eval = int(round(validation_fraction * n))
    if validation_fraction > 0 and (num_eval == 0 or num_eval == n):
        raise ValueError(
            f"`validation_fraction` {validation_fraction} leaves {num_eval} of {n} rows for evaluation; "
            "use 0 (evaluate on the training rows) or a fraction that gives both sides rows."
        )
    eval_rows, train_rows = permutation[:num_eval], permutation[num_eval:]
    train_embeddings = embeddings[train_rows]
    eval_embeddings = embeddings[eval_rows] if num_eval else train_embeddings

    # model and k-means initialisation from a sample of the training rows
    set_seed(seed)
    model = RQVAEModel(config)
    generator = torch.Generator().manual_seed(seed)
    sample = train_embeddings
    if sample.shape[0] > _SAMPLE_ROWS:
        sample = sample[torch.randperm(sample.shape[0], generator=generator)[:_SAMPLE_ROWS]]
    model.kmeans_init(sample, generator=generator)

    args = TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=max_epochs,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=max(batch_size, 4096),
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        lr_scheduler_type="constant",
        eval_strategy="epoch",
        save_strategy="epoch",
        logging_strategy="epoch",
        save_total_limit=2,
        save_only_model=True,
        load_best_model_at_end=True,
        metric_for_best_model=f"eval_{selection_metric}",
        greater_is_better=False,
        eval_on_start=True,  # history starts with the k-means-initialised model
        label_names=[],  # the embeddings are their own target; the model returns the loss
        remove_unused_columns=False,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        seed=seed,
        data_seed=seed,
        disable_tqdm=not progress,
    )
    rqvae_callback = RQVAETrainingCallback(sample, eval_embeddings, seed=seed)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=EmbeddingDataset(train_embeddings),
        eval_dataset=EmbeddingDataset(eval_embeddings),
        callbacks=[rqvae_callback, EarlyStoppingCallback(early_stopping_patience=patience)],
    )
    trainer.remove_callback(PrinterCallback)  # no printed log lines when the progress bar is off
    # keep Trainer's bar (its own tqdm) but not the per-checkpoint "Writing model shards" bars
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        trainer.train()
    finally:
        if bars_were_enabled:
            hf_logging.enable_progress_bar()

    model = trainer.model.eval()
    history = rqvae_callback.history
    best = [entry["epoch"] for entry in history if entry["global_step"] == trainer.state.best_global_step]
    last_epoch = history[-1]["epoch"] if history else 0
    return RQVAETrainingResult(
        model=model,
        history=history,
        best_epoch=best[-1] if best else last_epoch,
        stopped_early=last_epoch < max_epochs,
    )
