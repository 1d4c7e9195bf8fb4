"""RQ-VAE location quantizer (modeling_mobility/rqvae) and its Trainer-based training (train/rqvae.py)."""

from __future__ import annotations

import json
import math
import os
import textwrap
from collections import Counter

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel

from modeling_mobility.rqvae import RQVAEConfig, RQVAEModel, RQVAEOutput
from modeling_mobility.rqvae.modeling_rqvae import sinkhorn_assign
from train.rqvae import codebook_report, train_rqvae


def tiny_config(**overrides) -> RQVAEConfig:
    values = dict(input_dim=32, hidden_sizes=[64, 32], code_dim=8, num_quantizers=3, codebook_size=16)
    values.update(overrides)
    return RQVAEConfig(**values)


def gaussian_clusters(num_clusters: int, per_cluster: int, dim: int, noise: float, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_clusters, dim, generator=generator)
    labels = torch.arange(num_clusters).repeat_interleave(per_cluster)
    x = centres[labels] + noise * torch.randn(len(labels), dim, generator=generator)
    return x, labels


def collision_rate(codes: torch.Tensor) -> float:
    return 1.0 - len({tuple(row) for row in codes.tolist()}) / len(codes)


# configuration


@pytest.mark.parametrize(
    "overrides",
    [
        {"use_batch_norm": "False"},  # the ancestors' `--bn False` bug: a string must not pass as a bool
        {"use_batch_norm": 0},
        {"sinkhorn_last_level": "yes"},
        {"codebook_size": 1},
        {"num_quantizers": 0},
        {"hidden_sizes": [64, 0]},
        {"hidden_sizes": "64"},
        {"code_dim": 2.5},
        {"dropout": 1.0},
        {"sinkhorn_epsilon": 0.0},
        {"commitment_weight": -0.1},
        {"dead_code_threshold": -1},
        {"input_dim": True},
    ],
)
def test_config_rejects_bad_values(overrides):
    with pytest.raises(ValueError, match=next(iter(overrides))):
        tiny_config(**overrides)


def test_config_defaults_and_serialisation(tmp_path):
    config = RQVAEConfig()
    assert (config.input_dim, config.hidden_sizes, config.code_dim) == (384, [256, 128, 64], 32)
    assert (config.num_quantizers, config.codebook_size, config.commitment_weight) == (4, 64, 0.25)
    assert config.use_batch_norm is False and config.max_unique_codes == 64**4
    tiny_config(hidden_sizes=(8,)).save_pretrained(tmp_path)
    loaded = RQVAEConfig.from_pretrained(tmp_path)
    assert loaded.hidden_sizes == [8] and loaded.model_type == "hf-mobility-rqvae" and loaded.use_batch_norm is False


# model


@pytest.mark.parametrize("use_batch_norm", [False, True])
def test_forward_shapes_and_losses(use_batch_norm):
    torch.manual_seed(0)
    config = tiny_config(use_batch_norm=use_batch_norm, dropout=0.1)
    model = RQVAEModel(config)
    x = torch.randn(40, 32)
    out = model(x)
    assert isinstance(out, RQVAEOutput)
    assert out.reconstruction.shape == (40, 32)
    assert out.latent.shape == out.quantized.shape == (40, 8)
    assert out.codes.shape == (40, 3) and out.codes.dtype == torch.long
    assert int(out.codes.min()) >= 0 and int(out.codes.max()) < 16
    assert torch.isfinite(out.loss) and out.loss.ndim == 0
    torch.testing.assert_close(out.loss, out.reconstruction_loss + out.quantization_loss)
    assert all(bool(q.initialized) for q in model.quantizers)  # k-means from the first training batch
    # the quantized latent is the sum of the chosen code vectors
    code_sum = sum(model.quantizers[level].codebook[out.codes[:, level]] for level in range(3))
    torch.testing.assert_close(out.quantized, code_sum)
    as_tuple = model(x, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 7
    no_loss = model.eval()(x, return_loss=False)
    assert no_loss.loss is None and no_loss.codes.shape == (40, 3)
    with pytest.raises(ValueError, match="embeddings"):
        model(torch.randn(4, 31))


def test_gradients_reach_encoder_decoder_and_codebooks():
    torch.manual_seed(0)
    model = RQVAEModel(tiny_config())
    x = torch.randn(64, 32)
    model.kmeans_init(x)
    model(x).loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert float(parameter.grad.abs().sum()) > 0, name


def test_init_weights_cover_every_parameter_and_buffer():
    torch.manual_seed(0)
    model = RQVAEModel(tiny_config())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert not torch.isnan(tensor.float()).any(), name
    for quantizer in model.quantizers:
        assert not bool(quantizer.initialized)
        # normal(0, initializer_range), not torch's default init
        assert 0.005 < float(quantizer.codebook.detach().std()) < 0.05
    linear = model.encoder.layers[0]
    assert float(linear.bias.detach().abs().sum()) == 0.0
    # kaiming-uniform with ReLU gain: bound sqrt(6 / fan_in)
    assert float(linear.weight.detach().abs().max()) <= math.sqrt(6 / 32) + 1e-6
    assert float(linear.weight.detach().abs().max()) > 0.8 * math.sqrt(6 / 32)
    model.kmeans_init(torch.randn(200, 32))
    for quantizer in model.quantizers:
        assert bool(quantizer.initialized) and float(quantizer.codebook.detach().abs().sum()) > 0


def test_loss_falls_on_clustered_data():
    torch.manual_seed(0)
    x, _ = gaussian_clusters(8, 64, 32, noise=0.1)
    model = RQVAEModel(tiny_config(codebook_size=8))
    model.kmeans_init(x)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    with torch.no_grad():
        first = float(model(x).loss)
    for _ in range(300):
        optimizer.zero_grad()
        loss = model(x[torch.randint(len(x), (128,))]).loss
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        last = float(model(x).loss)
    assert last < 0.3 * first


def test_kmeans_init_gives_distinct_codes_and_is_deterministic():
    x = torch.randn(500, 32)
    models = []
    for _ in range(2):
        torch.manual_seed(123)  # model construction only; k-means uses the generator
        model = RQVAEModel(tiny_config())
        model.kmeans_init(x, generator=torch.Generator().manual_seed(7))
        models.append(model)
    for level, quantizer in enumerate(models[0].quantizers):
        codebook = quantizer.codebook.detach()
        assert torch.unique(codebook, dim=0).shape[0] == 16, level
        torch.testing.assert_close(codebook, models[1].quantizers[level].codebook.detach(), rtol=0, atol=0)
    # fewer rows than codes still gives distinct codes
    small = RQVAEModel(tiny_config())
    small.kmeans_init(torch.randn(5, 32))
    assert torch.unique(small.quantizers[0].codebook.detach(), dim=0).shape[0] == 16


def test_reseed_dead_codes_changes_only_unused_codes():
    torch.manual_seed(0)
    model = RQVAEModel(tiny_config(dead_code_threshold=2))
    x = torch.randn(300, 32)
    model.kmeans_init(x)
    before = model.codebooks.clone()
    counts = torch.full((3, 16), 5, dtype=torch.long)
    counts[0, 3] = 0
    counts[2, [1, 7]] = 1  # below the threshold of 2
    reseeded = model.reseed_dead_codes(x, counts, generator=torch.Generator().manual_seed(0))
    assert reseeded == [1, 0, 2]
    after = model.codebooks
    changed = (after != before).any(-1)
    expected = torch.zeros(3, 16, dtype=torch.bool)
    expected[0, 3] = expected[2, 1] = expected[2, 7] = True
    assert torch.equal(changed, expected)
    # a re-seeded level-0 code is a latent of one of the rows
    latents = model.encoder(x).detach()
    assert torch.isclose(latents, after[0, 3], atol=1e-5).all(-1).any()
    # without counts, usage is recomputed; with threshold 0 nothing happens
    assert len(model.reseed_dead_codes(x)) == 3
    assert RQVAEModel(tiny_config(dead_code_threshold=0)).reseed_dead_codes(x, counts) == [0, 0, 0]
    with pytest.raises(ValueError, match="counts"):
        model.reseed_dead_codes(x, torch.zeros(2, 16))


def test_sinkhorn_assign_balances_and_matches():
    generator = torch.Generator().manual_seed(0)
    # many rows, all closest to code 0: the balanced assignment spreads them over the codes
    distances = torch.rand(640, 8, generator=generator) + 1.0
    distances[:, 0] = 0.0
    balanced = sinkhorn_assign(distances, 0.003, 50)
    assert torch.bincount(balanced, minlength=8).max() < 200 and distances.argmin(1).unique().numel() == 1
    # fewer rows than codes: a one-to-one matching that keeps each row near its best code
    distances = torch.tensor([[0.0, 0.1, 5.0, 5.0], [0.0, 5.0, 0.2, 5.0], [0.0, 5.0, 5.0, 0.3]])
    assert sinkhorn_assign(distances, 0.003, 50).tolist() in ([0, 2, 3], [1, 0, 3], [1, 2, 0])
    # groups are solved independently
    grouped = sinkhorn_assign(torch.cat([distances, distances]), 0.003, 50, groups=torch.tensor([0, 0, 0, 1, 1, 1]))
    assert len(set(grouped[:3].tolist())) == 3 and len(set(grouped[3:].tolist())) == 3


def test_sinkhorn_reduces_collisions_on_near_duplicates():
    torch.manual_seed(0)
    model = RQVAEModel(tiny_config())
    model.kmeans_init(torch.randn(1000, 32))
    # 4 base locations, 100 near-duplicates each: a group shares its nearest codes on every level
    base = torch.randn(4, 32)
    x = base.repeat_interleave(100, 0) + 1e-2 * torch.randn(400, 32)
    argmax_codes = model.get_codes(x, use_sinkhorn=False)
    sinkhorn_codes = model.get_codes(x, use_sinkhorn=True)
    assert torch.equal(argmax_codes[:, :2], sinkhorn_codes[:, :2])  # only the last level is balanced
    distinct = {tuple(row) for row in sinkhorn_codes.tolist()}
    assert len(distinct) >= 2 * len({tuple(row) for row in argmax_codes.tolist()})
    assert collision_rate(sinkhorn_codes) < collision_rate(argmax_codes)
    # each code takes at most about its share n / K of the rows
    assert int(torch.bincount(sinkhorn_codes[:, 2], minlength=16).max()) <= 2 * 400 // 16
    assert torch.equal(model.get_codes(x), sinkhorn_codes)  # config.sinkhorn_last_level is the default


@pytest.mark.parametrize("input_dim", [32, 384])
def test_get_unique_codes_on_20000_rows(input_dim):
    torch.manual_seed(0)
    config = tiny_config(input_dim=input_dim, hidden_sizes=[32], num_quantizers=3, codebook_size=32)
    model = RQVAEModel(config)
    x = torch.randn(20_000, input_dim)
    model.kmeans_init(x[:2000])
    codes, report = model.get_unique_codes(x)
    assert codes.shape == (20_000, 3) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < 32
    assert collision_rate(codes) == 0.0 and report["collision_rate_final"] == 0.0
    assert report["collision_rate_before"] > report["collision_rate_after_sinkhorn"] > 0.0
    assert report["num_moved"] > 0 and report["num_rows"] == 20_000
    assert len(report["usage"]) == len(report["perplexity"]) == 3
    again, _ = model.get_unique_codes(x)
    assert torch.equal(codes, again)
    # rows in last-level buckets without a collision keep their nearest codes
    nearest = model.get_codes(x, use_sinkhorn=False)
    full, prefix = Counter(map(tuple, nearest.tolist())), Counter(map(tuple, nearest[:, :2].tolist()))
    colliding_prefixes = {key[:2] for key, count in full.items() if count > 1}
    untouched = torch.tensor([key not in colliding_prefixes for key in map(tuple, nearest[:, :2].tolist())])
    assert untouched.sum() > 0 and len(prefix) > len(colliding_prefixes)
    assert torch.equal(codes[untouched], nearest[untouched])


def test_get_unique_codes_full_and_collapsed():
    torch.manual_seed(0)
    # exactly codebook_size ** num_quantizers rows, all identical: every tuple is used once
    model = RQVAEModel(tiny_config(num_quantizers=2, codebook_size=8))
    model.kmeans_init(torch.randn(100, 32))
    codes, report = model.get_unique_codes(torch.zeros(64, 32))
    assert collision_rate(codes) == 0.0 and report["collision_rate_before"] == 1 - 1 / 64
    assert sorted(map(tuple, codes.tolist())) == [(a, b) for a in range(8) for b in range(8)]
    # an uninitialised model maps most rows to the same prefix: buckets overflow and rows move up a level
    collapsed = RQVAEModel(tiny_config(num_quantizers=3, codebook_size=8))
    codes, report = collapsed.get_unique_codes(torch.randn(500, 32))
    assert collision_rate(codes) == 0.0 and report["num_moved"] > 0
    with pytest.raises(ValueError, match="embeddings"):
        model.get_unique_codes(torch.randn(65, 32))


def test_decode_codes_matches_forward():
    torch.manual_seed(0)
    model = RQVAEModel(tiny_config())
    x = torch.randn(50, 32)
    model.kmeans_init(x)
    model.eval()
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(model.decode_codes(out.codes), out.reconstruction)
    with pytest.raises(ValueError, match="codes"):
        model.decode_codes(torch.full((2, 3), 16))
    with pytest.raises(ValueError, match="codes"):
        model.decode_codes(torch.zeros(2, 2, dtype=torch.long))


def test_codebook_report_hand_computed():
    report = codebook_report(np.array([[0, 0], [0, 1], [0, 1], [1, 1]]), 2)
    assert report["num_rows"] == 4 and report["num_unique"] == 3
    assert report["collision_rate"] == pytest.approx(0.25)
    assert report["usage"] == [1.0, 1.0]
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert report["perplexity"] == pytest.approx([math.exp(entropy), math.exp(entropy)])
    assert codebook_report(torch.zeros(5, 3, dtype=torch.long), 4)["usage"] == [0.25, 0.25, 0.25]
    with pytest.raises(ValueError, match="codes"):
        codebook_report(np.array([[0, 4]]), 4)


# save / load


def _trained_tiny_model() -> tuple[RQVAEModel, torch.Tensor]:
    torch.manual_seed(0)
    model = RQVAEModel(tiny_config())
    x = torch.randn(300, 32)
    model.kmeans_init(x)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(5):
        optimizer.zero_grad()
        model(x).loss.backward()
        optimizer.step()
    return model.eval(), x


def test_save_pretrained_writes_remote_code_and_round_trips(tmp_path):
    import modeling_mobility  # noqa: F401  (registers the Auto classes)

    model, x = _trained_tiny_model()
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"config.json", "model.safetensors", "configuration_rqvae.py", "modeling_rqvae.py"} <= files
    assert "pytorch_model.bin" not in files
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_rqvae.RQVAEConfig",
        "AutoModel": "modeling_rqvae.RQVAEModel",
    }
    assert config["model_type"] == "hf-mobility-rqvae"
    assert set(load_file(tmp_path / "model.safetensors")) == set(model.state_dict())

    loaded = RQVAEModel.from_pretrained(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    with torch.no_grad():
        a, b = model(x), loaded(x)
    torch.testing.assert_close(a.reconstruction, b.reconstruction, rtol=0, atol=0)
    assert torch.equal(model.get_unique_codes(x)[0], loaded.get_unique_codes(x)[0])
    # in-library Auto classes (modeling_mobility/auto.py)
    auto_loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(auto_loaded, RQVAEModel)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), RQVAEConfig)


_FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys

    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)
    x = torch.load(sys.argv[2])
    print(json.dumps({
        "module": type(model).__module__,
        "codes": model.get_codes(x).tolist(),
        "unique": model.get_unique_codes(x)[0].tolist(),
        "reconstruction": model.decode_codes(model.get_codes(x, use_sinkhorn=False)).tolist(),
    }))
    """
)


def test_trust_remote_code_load_in_fresh_process(tmp_path, run_without_our_packages):
    model, x = _trained_tiny_model()
    model_dir = tmp_path / "saved model"
    model.save_pretrained(model_dir)
    torch.save(x, tmp_path / "x.pt")
    result = run_without_our_packages(_FRESH_PROCESS, model_dir, tmp_path / "x.pt")
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["module"].startswith("transformers_modules")
    assert payload["codes"] == model.get_codes(x).tolist()
    assert payload["unique"] == model.get_unique_codes(x)[0].tolist()
    expected = model.decode_codes(model.get_codes(x, use_sinkhorn=False))
    torch.testing.assert_close(torch.tensor(payload["reconstruction"]), expected)


# training


def test_train_rqvae_learns_clustered_data(tmp_path):
    # 16 clusters of 40 locations; within a cluster, locations differ along 4 shared directions (learnable)
    generator = torch.Generator().manual_seed(1)
    centres = 2 * torch.randn(16, 32, generator=generator)
    labels = torch.arange(16).repeat_interleave(40)
    factors = torch.randn(4, 32, generator=generator)
    x = centres[labels] + 0.5 * torch.randn(640, 4, generator=generator) @ factors
    x = x + 0.02 * torch.randn(640, 32, generator=generator)
    config = tiny_config(num_quantizers=4, codebook_size=16)
    result = train_rqvae(
        x.numpy(),
        config,
        output_dir=str(tmp_path),
        max_epochs=40,
        batch_size=32,
        learning_rate=3e-3,
        patience=40,
        progress=False,
    )
    history = result.history
    assert [entry["epoch"] for entry in history] == list(range(41))  # epoch 0: the k-means-initialised model
    assert history[0]["train_loss"] is None and history[-1]["train_loss"] is not None
    for key in ("eval_loss", "eval_reconstruction_loss", "eval_collision_rate", "eval_objective", "usage"):
        assert key in history[-1]
    assert len(history[-1]["usage"]) == 4 and len(history[-1]["reseeded"]) == 4
    assert not result.stopped_early and 1 <= result.best_epoch <= 40
    best = next(entry for entry in history if entry["epoch"] == result.best_epoch)
    assert best["eval_objective"] == min(entry["eval_objective"] for entry in history[1:])
    assert best["eval_loss"] < 0.2 * history[0]["eval_loss"]
    # the restored model is the best checkpoint
    saved = load_file(tmp_path / f"checkpoint-{best['global_step']}" / "model.safetensors")
    for name, tensor in result.model.state_dict().items():
        assert torch.equal(tensor.cpu(), saved[name]), name
    assert not result.model.training
    codes = result.model.get_codes(x, use_sinkhorn=False)
    assert collision_rate(codes) < 0.3  # one code per cluster would be 0.975
    # locations of one cluster share their first code
    purity = sum(codes[labels == c, 0].bincount().max() for c in range(16)) / len(x)
    assert purity > 0.85


def test_train_rqvae_stops_early_and_is_deterministic(tmp_path):
    x, _ = gaussian_clusters(8, 30, 32, noise=0.1)
    config = tiny_config(dead_code_threshold=0)
    kwargs = dict(max_epochs=30, batch_size=64, patience=2, learning_rate=0.0, progress=False)
    frozen = train_rqvae(x, config, output_dir=str(tmp_path / "a"), **kwargs)
    # nothing changes: epoch 1 is the best, `patience` more epochs without improvement stop training
    assert frozen.stopped_early and frozen.best_epoch == 1 and frozen.history[-1]["epoch"] == 3
    runs = [
        train_rqvae(x, tiny_config(), output_dir=str(tmp_path / name), max_epochs=3, batch_size=64, progress=False)
        for name in ("b", "c")
    ]
    for name, tensor in runs[0].model.state_dict().items():
        assert torch.equal(tensor, runs[1].model.state_dict()[name]), name
    with pytest.raises(ValueError, match="input_dim"):
        train_rqvae(x[:, :16], config, output_dir=str(tmp_path / "d"))
    with pytest.raises(ValueError, match="selection_metric"):
        train_rqvae(x, config, output_dir=str(tmp_path / "d"), selection_metric="accuracy")


def test_semantics_kept_first_level_codes_follow_categories(tmp_path):
    """Proxy for location descriptions: 12 categories as clusters of 40 items in 384-d (centre + noise)."""
    generator = torch.Generator().manual_seed(3)
    centres = torch.nn.functional.normalize(torch.randn(12, 384, generator=generator), dim=1)
    labels = torch.arange(12).repeat_interleave(40)
    x = centres[labels] + 0.03 * torch.randn(480, 384, generator=generator)
    x = torch.nn.functional.normalize(x, dim=1)
    config = RQVAEConfig(input_dim=384, hidden_sizes=[128, 64], code_dim=16, num_quantizers=3, codebook_size=16)
    result = train_rqvae(x, config, output_dir=str(tmp_path), max_epochs=20, batch_size=64, patience=5, progress=False)
    codes, report = result.model.get_unique_codes(x)
    assert report["collision_rate_final"] == 0.0
    first = codes[:, 0]
    same_cluster = labels[:, None] == labels[None, :]
    off_diagonal = ~torch.eye(480, dtype=torch.bool)
    shared = (first[:, None] == first[None, :])[same_cluster & off_diagonal].float().mean()
    # a random assignment with the same first-level usage shares a code with probability sum_k p_k^2
    p = torch.bincount(first, minlength=16).double() / 480
    chance = float((p**2).sum())
    assert float(shared) >= 2 * chance
