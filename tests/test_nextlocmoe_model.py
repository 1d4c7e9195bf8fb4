"""NextLocMoE model (modeling_mobility/nextlocmoe): routing rules, TCN, personalised MoE, padding, training, weight
copying from a pretrained decoder, and save/load (also through `trust_remote_code` in a fresh process)."""

from __future__ import annotations

import json
import math
import textwrap

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel, LlamaConfig, LlamaForCausalLM

from modeling_mobility.nextlocmoe import (
    HistoryAwareRouter,
    NextLocMoEConfig,
    NextLocMoEForNextLocation,
    TemporalConvNet,
    threshold_routing,
    topk_routing,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HISTORY, CURRENT = 8, 3
TINY = dict(history_length=HISTORY, current_length=CURRENT, location_dim=16, time_dim=4, duration_dim=4,
            router_hidden_size=16, tcn_levels=3, lora_rank=4)
STEP_DIM = 16 + 2 * 4 + 4


def tiny_backbone(num_hidden_layers: int = 2) -> LlamaConfig:
    return LlamaConfig(hidden_size=32, num_hidden_layers=num_hidden_layers, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=64, vocab_size=128, max_position_embeddings=128)


def tiny_config(**overrides) -> NextLocMoEConfig:
    values = dict(TINY, backbone_config=tiny_backbone(), prompt_token_ids=[3, 9, 27])
    values.update(overrides)
    return NextLocMoEConfig(**values)


def tiny_model(seed: int = 0, **overrides) -> NextLocMoEForNextLocation:
    torch.manual_seed(seed)
    return NextLocMoEForNextLocation(tiny_config(**overrides)).eval()


def random_batch(batch: int = 4, history=HISTORY, current=CURRENT, seed: int = 0, history_lengths=None,
                 current_lengths=None) -> dict[str, torch.Tensor]:
    """A left-padded batch: `history_lengths[i]` real history steps at the end of row i (all real by default)."""
    g = torch.Generator().manual_seed(seed)

    def window(length, lengths):
        lengths = torch.full((batch,), length) if lengths is None else torch.tensor(lengths)
        mask = torch.arange(length)[None, :] >= (length - lengths)[:, None]
        time = torch.stack([torch.randint(0, 7, (batch, length), generator=g),
                            torch.randint(0, 24, (batch, length), generator=g)], dim=-1)
        xy = torch.randn(batch, length, 2, generator=g) * 1000.0 + torch.tensor([5000.0, -3000.0])
        return xy, time, torch.rand(batch, length, generator=g) * 12.0, mask

    h = window(history, history_lengths)
    c = window(current, current_lengths)
    names = ("xy", "time", "duration", "mask")
    return {**{f"history_{k}": v for k, v in zip(names, h)}, **{f"current_{k}": v for k, v in zip(names, c)}}


def left_pad(batch: dict[str, torch.Tensor], history: int, current: int) -> dict[str, torch.Tensor]:
    """The same samples with extra left padding (junk values on the padded steps) up to the given lengths."""
    out = {}
    for key, value in batch.items():
        target = history if key.startswith("history") else current
        extra = target - value.shape[1]
        if key.endswith("mask"):
            filler = torch.zeros(value.shape[0], extra, dtype=torch.bool)
        else:
            filler = torch.full((value.shape[0], extra, *value.shape[2:]), 3, dtype=value.dtype)
        out[key] = torch.cat([filler, value], dim=1)
    return out


# routing rules


def test_threshold_routing_hand_worked_cases():
    probs = torch.tensor([[0.1, 0.5, 0.3, 0.1]])
    # sorted 0.5 (expert 1), 0.3 (expert 2): cumulative 0.8 reaches the threshold -> renormalised 0.625 / 0.375
    torch.testing.assert_close(threshold_routing(probs, 0.8, 5), torch.tensor([[0.0, 0.625, 0.375, 0.0]]))
    torch.testing.assert_close(threshold_routing(probs, 0.8, 1), torch.tensor([[0.0, 1.0, 0.0, 0.0]]))  # the cap
    torch.testing.assert_close(threshold_routing(probs, 0.81, 5), torch.tensor([[0.1, 0.5, 0.3, 0.0]]) / 0.9)
    # the first expert alone is already over the threshold
    torch.testing.assert_close(threshold_routing(torch.tensor([0.05, 0.9, 0.05]), 0.8, 3),
                               torch.tensor([0.0, 1.0, 0.0]))
    # ties: the lower expert id ranks first
    torch.testing.assert_close(threshold_routing(torch.tensor([0.3, 0.1, 0.3, 0.3]), 0.5, 4),
                               torch.tensor([0.5, 0.0, 0.5, 0.0]))
    # threshold 1: every expert up to the cap
    torch.testing.assert_close(threshold_routing(probs, 1.0, 4), probs)
    torch.testing.assert_close(threshold_routing(probs, 1.0, 3), torch.tensor([[0.1, 0.5, 0.3, 0.0]]) / 0.9)
    # leading dimensions and gradients only through the kept probabilities
    logits = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(0), requires_grad=True)
    p = logits.softmax(-1)
    weights = threshold_routing(p, 0.7, 3)
    assert weights.shape == (2, 3, 6)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3))
    assert ((weights > 0).sum(-1) <= 3).all()
    leaf = p.detach().requires_grad_(True)
    # a weighted sum over the experts: every kept probability gets a gradient (only expert 0's weight would give
    # none in a row that does not keep expert 0)
    (threshold_routing(leaf, 0.7, 3) * torch.arange(1.0, 7.0)).sum().backward()
    kept = threshold_routing(leaf.detach(), 0.7, 3) > 0
    assert (leaf.grad[~kept] == 0).all() and (leaf.grad[kept] != 0).any()
    with pytest.raises(ValueError, match="threshold"):
        threshold_routing(probs, 0.0, 2)
    with pytest.raises(ValueError, match="max_experts"):
        threshold_routing(probs, 0.5, 0)


def test_topk_routing():
    probs = torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.4, 0.1, 0.1, 0.4]])
    torch.testing.assert_close(topk_routing(probs, 2), torch.tensor([[0.0, 0.625, 0.375, 0.0], [0.5, 0.0, 0.0, 0.5]]))
    torch.testing.assert_close(topk_routing(probs, 1), torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(topk_routing(torch.tensor([0.25, 0.25, 0.25, 0.25]), 3),
                               torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0]))
    torch.testing.assert_close(topk_routing(probs, 4), probs)
    with pytest.raises(ValueError, match="`k`"):
        topk_routing(probs, 5)


# history encoder


def test_tcn_is_causal_and_ignores_left_padding():
    torch.manual_seed(0)
    tcn = TemporalConvNet(6, num_levels=3, kernel_size=3, dropout=0.0).eval()
    x = torch.randn(2, 10, 6)
    with torch.no_grad():
        before = tcn(x)
        changed = x.clone()
        changed[:, 6] += 1.0
        after = tcn(changed)
    torch.testing.assert_close(after[:, :6], before[:, :6], rtol=0, atol=0)
    assert not torch.allclose(after[:, 6], before[:, 6])
    assert not torch.allclose(after[:, 9], before[:, 9])  # the change reaches later steps (dilations 1, 2, 4)
    # padded steps enter as zeros whatever they hold, and output zeros
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[:, :3] = False
    padded = torch.cat([torch.full((2, 3, 6), 7.0), x], dim=1)
    with torch.no_grad():
        out = tcn(padded, mask)
    torch.testing.assert_close(out[:, 3:], before, rtol=1e-5, atol=1e-5)
    assert (out[:, :3] == 0).all()


# personalised MoE and outputs


def test_outputs_shapes_and_loss():
    model = tiny_model()
    batch = random_batch(history_lengths=[8, 3, 0, 5], current_lengths=[3, 1, 2, 3])
    labels = torch.randn(4, 2) * 1000.0
    out = model(**batch, labels=labels)
    assert out.xy.shape == (4, 2) and out.duration.shape == (4,) and out.distance.shape == (4,)
    assert out.expert_load.shape == (1, 11) and out.role_weights.shape == (4, 11)
    assert out.function_weights.shape == (4, CURRENT, 5) and out.router_entropy.ndim == 0
    assert all(torch.isfinite(v).all() for v in out.values())
    torch.testing.assert_close(out.distance, (out.xy - labels).norm(dim=-1))
    torch.testing.assert_close(out.loss, out.distance.mean() + 300.0 * out.router_entropy)
    assert ((out.duration >= 0.1) & (out.duration <= 24.0)).all()
    # location-semantics MoE: top-2 raw probabilities on real current steps, nothing on padded ones
    weights = out.function_weights
    assert ((weights > 0).sum(-1) == 2)[batch["current_mask"]].all()
    assert (weights.sum(-1) < 1)[batch["current_mask"]].all()
    assert (weights[~batch["current_mask"]] == 0).all()
    torch.testing.assert_close(out.role_weights.sum(-1), torch.ones(4))
    torch.testing.assert_close(out.expert_load.sum(-1), torch.ones(1))
    no_labels = model(**batch)
    assert no_labels.loss is None and no_labels.distance is None
    torch.testing.assert_close(no_labels.xy, out.xy)
    as_tuple = model(**batch, labels=labels, return_dict=False)
    torch.testing.assert_close(as_tuple[0], out.loss)
    assert len(as_tuple) == 9


def test_router_statistics_match_a_hand_computation():
    model = tiny_model(moe_layers=[0, 1])
    batch = random_batch(history_lengths=[8, 2, 0, 6], current_lengths=[3, 3, 1, 2])
    with torch.no_grad():
        out = model(**batch)
    token_mask = torch.cat([torch.ones(4, 3, dtype=torch.bool), batch["history_mask"], batch["current_mask"]], 1)
    entropies, loads, per_sample = [], [], []
    for moe in model.moe_mlps():
        probs = moe.router_probs[token_mask]  # (N, E): the real tokens
        assert (moe.router_probs[~token_mask] == 0).all()
        torch.testing.assert_close(probs.sum(-1), torch.ones(len(probs)))
        entropies.append(-(probs * probs.log()).sum(-1).mean())
        weights = threshold_routing(probs, 0.8, 5)
        torch.testing.assert_close(moe.routing_weights[token_mask], weights)
        loads.append(weights.mean(0))
        per_sample.append(torch.stack([moe.routing_weights[i][token_mask[i]].mean(0) for i in range(4)]))
    torch.testing.assert_close(out.router_entropy, torch.stack(entropies).mean())
    torch.testing.assert_close(out.expert_load, torch.stack(loads))
    balance = [11 * (load * moe.router_probs[token_mask].mean(0)).sum() for load, moe in zip(loads, model.moe_mlps())]
    torch.testing.assert_close(out.load_balance, torch.stack(balance).mean())
    torch.testing.assert_close(out.role_weights, torch.stack(per_sample).mean(0))
    assert 0 < float(out.router_entropy) < math.log(11)
    # a router that cannot tell the experts apart: uniform probabilities, entropy log(E); threshold routing keeps
    # the cap of 5 (uniform 1/11 needs 9 experts for 0.8), ties to the lowest ids
    for moe in model.moe_mlps():
        with torch.no_grad():
            moe.router.gate.weight.zero_()
    with torch.no_grad():
        out = model(**batch)
    torch.testing.assert_close(out.router_entropy, torch.tensor(math.log(11)))
    torch.testing.assert_close(out.expert_load, torch.tensor([[0.2] * 5 + [0.0] * 6] * 2))
    torch.testing.assert_close(out.load_balance, torch.tensor(1.0))  # 11 * 5 * (0.2 * 1/11)
    # the balance term enters the loss with its weight (and not at all with the paper's weight 0)
    labels = torch.zeros(4, 2)
    with torch.no_grad():
        plain = model(**batch, labels=labels).loss
        model.config.load_balance_weight = 50.0
        weighted = model(**batch, labels=labels).loss
    torch.testing.assert_close(weighted - plain, torch.tensor(50.0), rtol=1e-4, atol=1e-3)


def test_router_equals_the_concatenated_fusion_mlp():
    """The router computes its first layer part by part and folds LayerNorm into the gate; it must equal the paper's
    form gate(LayerNorm(ReLU(W2 ReLU(W1 [token ; summary ; persona])))) computed on the concatenation."""
    torch.manual_seed(0)
    router = HistoryAwareRouter(32, 8, 16, 1e-5)
    with torch.no_grad():
        router.norm.weight.normal_()
        router.norm.bias.normal_()
    tokens, summary, personas = torch.randn(50, 32), torch.randn(50, 8), torch.randn(11, 32)
    joined = torch.cat([tokens[:, None].expand(-1, 11, -1), summary[:, None].expand(-1, 11, -1),
                        personas[None].expand(50, -1, -1)], dim=-1)
    reference = router.gate(router.norm(torch.relu(router.fusion_out(torch.relu(router.fusion_in(joined))))))
    torch.testing.assert_close(router(tokens, summary, personas), reference.squeeze(-1), atol=1e-5, rtol=1e-5)


def test_topk_routing_mode_and_moe_starts_as_the_frozen_mlp():
    model = tiny_model(routing="topk", routing_top_k=3)
    batch = random_batch(history_lengths=[8, 4, 1, 0])
    with torch.no_grad():
        model(**batch)
    moe = model.moe_mlps()[0]
    token_mask = torch.cat([torch.ones(4, 3, dtype=torch.bool), batch["history_mask"], batch["current_mask"]], 1)
    assert ((moe.routing_weights > 0).sum(-1) == 3)[token_mask].all()
    # LoRA B starts at zero and the weights sum to 1, so the MoE layer equals the original MLP on real tokens
    hidden = torch.randn(2, 5, 32)
    moe.set_context(torch.randn(2, STEP_DIM), torch.tensor([[True] * 5, [False, False, True, True, True]]))
    with torch.no_grad():
        mixed = moe(hidden)
    moe.clear_context()
    frozen = moe.down_proj(moe.act_fn(moe.gate_proj(hidden)) * moe.up_proj(hidden))
    torch.testing.assert_close(mixed[0], frozen[0])
    torch.testing.assert_close(mixed[1, 2:], frozen[1, 2:])
    assert (mixed[1, :2] == 0).all()
    with pytest.raises(RuntimeError, match="history summary"):
        moe(hidden)


def test_left_padding_does_not_change_the_prediction():
    model = tiny_model()
    short = random_batch(batch=3, history=5, current=2, seed=4, history_lengths=[5, 2, 0], current_lengths=[2, 2, 1])
    with torch.no_grad():
        reference = model(**short)
        padded = model(**left_pad(short, HISTORY, CURRENT))
    for key in ("xy", "duration", "role_weights", "router_entropy", "expert_load"):
        torch.testing.assert_close(padded[key], reference[key], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(padded.function_weights[:, -2:], reference.function_weights, rtol=1e-5, atol=1e-6)
    # a sample alone gives what it gives inside a padded batch
    with torch.no_grad():
        alone = model(**{k: v[1:2, -2:] if k.startswith("history") else v[1:2] for k, v in short.items()})
    torch.testing.assert_close(alone.xy, reference.xy[1:2], rtol=1e-5, atol=1e-4)
    # sample 2 has no real history step: its junk history values (random, then also 3s) are ignored
    assert torch.isfinite(reference.xy[2]).all()


def test_only_the_trainable_parts_change_after_an_optimizer_step():
    model = tiny_model(lora_dropout=0.0).train()
    frozen = {n: p.detach().clone() for n, p in model.backbone.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert "embed_tokens.weight" in frozen and "layers.1.mlp.gate_proj.weight" in frozen
    assert "layers.0.self_attn.q_proj.weight" in frozen and "layers.0.mlp.down_proj.weight" in frozen
    assert not any("norm" in n for n in frozen)  # the backbone's norms train
    personas = model.moe_mlps()[0].persona_vectors.clone()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = random_batch(batch=8, seed=2)
    optimizer.zero_grad()
    model(**batch, labels=torch.randn(8, 2) * 1000).loss.backward()
    optimizer.step()
    for name, value in model.backbone.named_parameters():
        if name in frozen:
            assert torch.equal(value, frozen[name]), name
    assert torch.equal(model.moe_mlps()[0].persona_vectors, personas)
    changed = {n for n, p in model.named_parameters() if n in trainable and not torch.equal(p, trainable[n])}
    assert "duration_head.weight" not in changed  # the duration is reported, not in the loss
    for name in ("location_head.weight", "history_projection.weight",
                 "current_projection.weight", "location_embedding.weight", "history_encoder.blocks.0.conv1.weight",
                 "function_router.0.weight", "backbone.layers.1.mlp.router.fusion_in.weight",
                 "backbone.layers.1.mlp.router.gate.weight", "backbone.norm.weight"):
        assert name in changed, name
    assert any(n.startswith("function_experts.") for n in changed)
    lora_b = {n for n in changed if "_lora_B" in n}
    assert {n.split(".experts.")[1].split(".")[1] for n in lora_b} == {"gate_lora_B", "up_lora_B", "down_lora_B"}


def test_loss_falls_on_a_learnable_task():
    # the next point is the last current point plus a fixed offset
    model = tiny_model(tcn_dropout=0.0, lora_dropout=0.0, role_names=["a", "b", "c", "d"], max_experts=2).train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    offset = torch.tensor([300.0, -200.0])
    losses, distances = [], []
    for step in range(100):
        batch = random_batch(batch=32, seed=100 + step)
        out = model(**batch, labels=batch["current_xy"][:, -1] + offset)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
        distances.append(out.distance.mean().item())
    assert np.mean(losses[-10:]) < 0.25 * np.mean(losses[:10]), (losses[:10], losses[-10:])
    assert np.mean(distances[-10:]) < 0.4 * np.mean(distances[:10]), (distances[:10], distances[-10:])


# description vectors and expert initialisation


def test_description_vectors_and_semantic_initialisation():
    model = tiny_model()
    table = model.backbone.get_input_embeddings().weight
    vectors = model.description_vectors([[1, 2, 3], [5], list(range(10, 80))], max_tokens=60)
    assert vectors.shape == (3, 32) and vectors.dtype == torch.float32
    torch.testing.assert_close(vectors[0], table[[1, 2, 3]].mean(0))
    torch.testing.assert_close(vectors[1], table[5])
    torch.testing.assert_close(vectors[2], table[10:70].mean(0))  # truncated to 60 tokens
    with pytest.raises(ValueError, match="empty"):
        model.description_vectors([[1], []])
    with pytest.raises(ValueError, match="vocabulary"):
        model.description_vectors([[500]])

    functions, personas = torch.randn(5, 32), torch.randn(11, 32)
    model.set_semantic_vectors(functions, personas, generator=torch.Generator().manual_seed(0))
    for moe in model.moe_mlps():
        torch.testing.assert_close(moe.persona_vectors, personas)
    weights = torch.stack([expert.weight for expert in model.function_experts])  # (F, location_dim, 2)
    torch.testing.assert_close(weights[..., 0], weights[..., 1])  # one vector, used as both columns
    column = weights[..., 0]
    torch.testing.assert_close(column.mean(-1), torch.zeros(5), rtol=0, atol=1e-5)  # layer-normalised
    torch.testing.assert_close(column.var(-1, unbiased=False), torch.ones(5), rtol=1e-3, atol=1e-3)
    again = tiny_model()
    again.set_semantic_vectors(functions, None, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again.function_experts[2].weight, model.function_experts[2].weight)
    with pytest.raises(ValueError, match="persona_vectors"):
        model.set_semantic_vectors(None, torch.randn(10, 32))


# pretrained backbones


def test_from_backbone_copies_the_first_layers(tmp_path):
    torch.manual_seed(0)
    original = LlamaForCausalLM(tiny_backbone(num_hidden_layers=4)).eval()
    model = NextLocMoEForNextLocation.from_backbone(original, num_backbone_layers=3, **TINY).eval()
    assert model.config.backbone_config.num_hidden_layers == 3 and model.config.moe_layers == [2]
    assert len(model.backbone.layers) == 3
    source = original.model.state_dict()
    for key, value in model.backbone.state_dict().items():
        if key in source:
            assert torch.equal(value, source[key]), key
    assert torch.equal(model.moe_mlps()[0].gate_proj.weight, original.model.layers[2].mlp.gate_proj.weight)
    # with the LoRA updates still zero, the truncated copy computes the original's first three layers
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        reference = original.model.norm(original.model(input_ids=ids, output_hidden_states=True).hidden_states[3])
        model.moe_mlps()[0].set_context(torch.randn(2, STEP_DIM))
        ours = model.backbone(input_ids=ids).last_hidden_state
        model.moe_mlps()[0].clear_context()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    # from a saved folder, the base model alone, and errors
    original.save_pretrained(tmp_path / "llm")
    from_folder = NextLocMoEForNextLocation.from_backbone(str(tmp_path / "llm"), num_backbone_layers=2, **TINY)
    assert torch.equal(from_folder.backbone.layers[1].mlp.up_proj.weight, original.model.layers[1].mlp.up_proj.weight)
    from_base = NextLocMoEForNextLocation.from_backbone(original.model, **TINY)
    assert len(from_base.backbone.layers) == 4
    assert not from_base.backbone.embed_tokens.weight.requires_grad
    with pytest.raises(ValueError, match="num_backbone_layers"):
        NextLocMoEForNextLocation.from_backbone(original, num_backbone_layers=5, **TINY)
    with pytest.raises(ValueError, match="backbone_config"):
        NextLocMoEForNextLocation.from_backbone(original, backbone_config=tiny_backbone(), **TINY)


# save and load


def test_save_load_round_trip(tmp_path):
    model = tiny_model(routing="topk")
    model.set_semantic_vectors(torch.randn(5, 32), torch.randn(11, 32))
    batch = random_batch(history_lengths=[8, 3, 0, 5])
    with torch.no_grad():
        expected = model(**batch)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, NextLocMoEForNextLocation)
    saved, got = model.config.to_dict(), loaded.config.to_dict()
    for values in (saved, got, saved["backbone_config"], got["backbone_config"]):  # loading records these two
        values.pop("_name_or_path", None)
        values.pop("dtype", None)
    assert got == saved
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == [
        n for n, p in model.named_parameters() if p.requires_grad]
    with torch.no_grad():
        got = loaded(**batch)
    for key in ("xy", "duration", "role_weights", "expert_load", "function_weights", "router_entropy"):
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


def test_initialisation_also_of_keys_missing_from_a_checkpoint(tmp_path):
    """Construction and `from_pretrained` (for keys a checkpoint lacks) use the same scheme: LoRA B zero, A
    Kaiming-uniform, new layers Normal(0, initializer_range), persona vectors Normal(0, initializer_range)."""
    from safetensors.torch import load_file, save_file

    model = tiny_model()
    moe = model.moe_mlps()[0]
    bound = 1 / math.sqrt(32)  # Kaiming-uniform with a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    for expert in moe.experts:
        assert all(getattr(expert, f"{n}_lora_B").eq(0).all() for n in ("gate", "up", "down"))
        assert 0.5 * bound < expert.gate_lora_A.abs().max() <= bound
    assert abs(moe.persona_vectors.std() - 0.02) < 0.005 and abs(moe.router.fusion_in.weight.std() - 0.02) < 0.005
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    dropped = ["backbone.layers.1.mlp.experts.0.gate_lora_A", "backbone.layers.1.mlp.experts.0.gate_lora_B",
               "backbone.layers.1.mlp.persona_vectors", "backbone.layers.1.mlp.router.fusion_in.weight",
               "function_experts.0.weight", "history_encoder.blocks.0.conv1.weight"]
    save_file({k: v for k, v in state.items() if k not in dropped}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    loaded, info = NextLocMoEForNextLocation.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["missing_keys"]) == set(dropped)
    again = loaded.moe_mlps()[0]
    assert again.experts[0].gate_lora_B.eq(0).all() and 0.5 * bound < again.experts[0].gate_lora_A.abs().max() <= bound
    for tensor in (again.persona_vectors, again.router.fusion_in.weight, loaded.function_experts[0].weight,
                   loaded.history_encoder.blocks[0].conv1.weight):
        assert torch.isfinite(tensor).all() and 0.01 < float(tensor.detach().std()) < 0.04
    assert torch.equal(again.experts[0].up_lora_A, moe.experts[0].up_lora_A)  # loaded tensors are kept
    assert torch.equal(loaded.function_experts[1].weight, model.function_experts[1].weight)


_FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys

    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    batch = torch.load(sys.argv[2])
    with torch.no_grad():
        out = model(**batch)
    print(json.dumps({
        "module": type(model).__module__,
        "xy": out.xy.tolist(),
        "role_weights": out.role_weights.tolist(),
        "moe_layers": model.config.moe_layers,
        "frozen": not model.backbone.embed_tokens.weight.requires_grad,
    }))
    """
)


def test_trust_remote_code_load_in_fresh_process(tmp_path, run_without_our_packages):
    model = tiny_model(moe_layers=[0, 1])
    model.set_semantic_vectors(torch.randn(5, 32), torch.randn(11, 32))
    model_dir = tmp_path / "saved model"
    model.save_pretrained(model_dir)
    batch = random_batch(history_lengths=[8, 3, 0, 5], current_lengths=[3, 3, 1, 2])
    torch.save(batch, tmp_path / "batch.pt")
    result = run_without_our_packages(_FRESH_PROCESS, model_dir, tmp_path / "batch.pt")
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["module"].startswith("transformers_modules")
    assert payload["moe_layers"] == [0, 1] and payload["frozen"]
    with torch.no_grad():
        expected = model(**batch)
    torch.testing.assert_close(torch.tensor(payload["xy"]), expected.xy)
    torch.testing.assert_close(torch.tensor(payload["role_weights"]), expected.role_weights)


# configuration and input validation


def test_config_defaults_and_truncation():
    config = NextLocMoEConfig()
    assert config.step_dim == 176 and config.moe_layers == [1] and config.model_type == "hf-mobility-nextlocmoe"
    assert (config.history_length, config.current_length, config.num_functions, config.num_roles) == (40, 5, 5, 11)
    assert (config.routing, config.routing_threshold, config.max_experts, config.entropy_weight) == (
        "threshold", 0.8, 5, 300.0)
    assert config.backbone_config.model_type == "llama" and config.backbone_config.hidden_size == 64
    deep = LlamaConfig(hidden_size=32, num_hidden_layers=28, num_attention_heads=4, intermediate_size=64)
    truncated = NextLocMoEConfig(backbone_config=deep, num_backbone_layers=12)
    assert truncated.backbone_config.num_hidden_layers == 12 and truncated.moe_layers == [8, 10]
    assert deep.num_hidden_layers == 28  # the caller's config is not changed
    from_dict = NextLocMoEConfig(backbone_config=deep.to_dict(), num_backbone_layers=6)
    assert isinstance(from_dict.backbone_config, LlamaConfig) and from_dict.moe_layers == [4]
    again = NextLocMoEConfig.from_dict(truncated.to_dict())
    assert again.backbone_config.num_hidden_layers == 12 and again.moe_layers == [8, 10]
    assert NextLocMoEConfig.sub_configs == {"backbone_config": AutoConfig}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"routing": "sparse"}, "routing"),
        ({"routing_threshold": 0.0}, "routing_threshold"),
        ({"routing_threshold": 1.2}, "routing_threshold"),
        ({"max_experts": 0}, "max_experts"),
        ({"max_experts": 12}, "max_experts"),
        ({"routing_top_k": 12}, "routing_top_k"),
        ({"function_top_k": 6}, "function_top_k"),
        ({"coord_std": [1000.0, 0.0]}, "coord_std"),
        ({"coord_mean": [1.0]}, "coord_mean"),
        ({"location_dim": 0}, "location_dim"),
        ({"history_length": 0}, "history_length"),
        ({"num_backbone_layers": 3}, "num_backbone_layers"),
        ({"num_backbone_layers": 0}, "num_backbone_layers"),
        ({"moe_layers": [2]}, "moe_layers"),
        ({"moe_layers": [1, 1]}, "moe_layers"),
        ({"moe_layers": []}, "moe_layers"),
        ({"role_names": ["a", "a"]}, "role_names"),
        ({"function_names": "abc"}, "function_names"),
        ({"duration_max_hours": 0.05}, "duration_max_hours"),
        ({"prompt_token_ids": [1, 128]}, "prompt_token_ids"),
        ({"lora_rank": 0}, "lora_rank"),
        ({"tcn_dropout": 1.0}, "tcn_dropout"),
        ({"backbone_config": 7}, "backbone_config"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_input_validation():
    model = tiny_model()
    batch = random_batch()
    cases = [
        ({"history_xy": batch["history_xy"][..., :1]}, "history_xy"),
        ({"history_time": batch["history_time"][..., :1]}, "history_time"),
        ({"history_time": batch["history_time"].float()}, "integer"),
        ({"current_duration": batch["current_duration"][:, :2]}, "current_duration"),
        ({"current_mask": batch["current_mask"][:, :2]}, "current_mask"),
        ({"history_xy": None}, "required"),
        ({"current_time": batch["current_time"] + torch.tensor([0, 24])}, "hours"),
        ({k: v[:2] for k, v in batch.items() if k.startswith("current")}, "batch sizes"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            model(**{**batch, **change})
    with pytest.raises(ValueError, match="history_length"):
        model(**left_pad(batch, HISTORY + 1, CURRENT))
    with pytest.raises(ValueError, match="current_length"):
        model(**left_pad(batch, HISTORY, CURRENT + 1))
    with pytest.raises(ValueError, match="labels"):
        model(**batch, labels=torch.zeros(4, 3))
    # junk on padded steps is ignored (an hour of 99 on a padded step is fine)
    padded = random_batch(history_lengths=[8, 2, 0, 5])
    padded["history_time"][~padded["history_mask"]] = 99
    assert torch.isfinite(model(**padded).xy).all()


def test_predict_offset_starts_from_the_last_real_current_record():
    """With `predict_offset`, a zero location head predicts the last real record of the current window (left padding
    ignored); without it, the coordinate mean. The option survives a config round trip."""
    batch = random_batch(batch=3, current_lengths=[3, 1, 2])
    for offset in (True, False):
        model = tiny_model(predict_offset=offset, coord_mean=[100.0, -200.0])
        with torch.no_grad():
            model.location_head.weight.zero_()
            xy = model(**batch).xy
        expected = batch["current_xy"][:, -1] if offset else torch.tensor([[100.0, -200.0]]).expand(3, 2)
        torch.testing.assert_close(xy, expected.float())
    short = random_batch(batch=3, current=2, current_lengths=[2, 1, 2])
    model = tiny_model(predict_offset=True)
    with torch.no_grad():
        torch.testing.assert_close(model(**left_pad(short, HISTORY, CURRENT)).xy, model(**short).xy, rtol=1e-4,
                                   atol=1e-2)
    assert NextLocMoEConfig.from_dict(model.config.to_dict()).predict_offset is True
    with pytest.raises(ValueError, match="predict_offset"):
        tiny_config(predict_offset="yes")


def test_history_pointer_probabilities_and_likelihood_by_hand():
    """`history_pointer`: probabilities over the real visits plus "elsewhere" sum to 1, are 0 on padding, and
    `pointer_nll` is minus the log of the mass on the visits at the label's coordinates (summed over repeated visits),
    or of "elsewhere" when no real visit is there (a padded step with the label's coordinates does not count)."""
    batch = random_batch(batch=3, history_lengths=[8, 5, 2], current_lengths=[3, 3, 1])
    batch["history_xy"][0, 2] = batch["current_xy"][0, -1]  # row 0: the target visited twice
    batch["history_xy"][1, 0] = torch.tensor([1.0, 2.0])  # row 1: on a padded step only
    labels = torch.stack([batch["current_xy"][0, -1], torch.tensor([1.0, 2.0]), batch["history_xy"][2, -1]])
    model = tiny_model(history_pointer=True, pointer_size=8)
    with torch.no_grad():
        out = model(**batch, labels=labels)
    probs = out.pointer_probs
    assert probs.shape == (3, HISTORY + CURRENT + 1)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))
    mask = torch.cat([batch["history_mask"], batch["current_mask"]], dim=1)
    assert (probs[:, :-1][~mask] == 0).all() and (probs[:, :-1][mask] > 0).all()
    expected = torch.stack([
        -torch.log(probs[0, 2] + probs[0, HISTORY + CURRENT - 1]),
        -torch.log(probs[1, -1]),
        -torch.log(probs[2, HISTORY - 1]),
    ])
    torch.testing.assert_close(out.pointer_nll, expected)
    without = tiny_model(history_pointer=False)
    with torch.no_grad():
        plain = without(**batch, labels=labels)
    assert plain.pointer_probs is None and plain.pointer_nll is None
    # the loss adds pointer_weight x the mean likelihood term to the paper's loss
    config = model.config
    paper = (out.distance.mean() + config.entropy_weight * out.router_entropy)
    torch.testing.assert_close(out.loss, paper + config.pointer_weight * out.pointer_nll.mean())
    assert NextLocMoEConfig.from_dict(config.to_dict()).history_pointer is True
    for bad, message in (({"history_pointer": 1}, "history_pointer"), ({"pointer_size": 0}, "pointer_size"),
                         ({"pointer_weight": -1.0}, "pointer_weight")):
        with pytest.raises(ValueError, match=message):
            tiny_config(**bad)


def test_history_pointer_learns_to_point_at_a_repeated_place():
    """A learnable pointing task: the next place is the history visit whose hour is 7 (anywhere in the window); the
    pointer's likelihood of it rises well above chance."""
    model = tiny_model(history_pointer=True, tcn_dropout=0.0, lora_dropout=0.0, role_names=["a", "b"],
                       max_experts=2).train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    nlls = []
    for step in range(80):
        batch = random_batch(batch=32, seed=500 + step)
        g = torch.Generator().manual_seed(step)
        where = torch.randint(0, HISTORY, (32,), generator=g)
        batch["history_time"][..., 1] = torch.where(batch["history_time"][..., 1] == 7, 8, batch["history_time"][..., 1])
        batch["history_time"][torch.arange(32), where, 1] = 7
        labels = batch["history_xy"][torch.arange(32), where]
        out = model(**batch, labels=labels)
        optimizer.zero_grad()
        (out.pointer_nll.mean()).backward()
        optimizer.step()
        nlls.append(out.pointer_nll.mean().item())
    chance = math.log(HISTORY + CURRENT + 1)
    assert np.mean(nlls[:5]) > 0.8 * chance, nlls[:5]
    assert np.mean(nlls[-10:]) < 0.5 * chance, nlls[-10:]
