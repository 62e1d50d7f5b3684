"""The H-MGDM model: encoder isolation, deterministic encode, learning, ablation flags."""

from __future__ import annotations

import pytest
import torch
from region_graphs import random_region_graph
from torch_geometric.data import Batch
from torch_geometric.utils import to_dense_batch

from hmgdm_core.config import load_config
from hmgdm_core.data import feature_moments, graph_dims, stats_from_moments
from hmgdm_core.exceptions import ConfigError
from hmgdm_core.federation_config import FederationConfig, shared_names
from hmgdm_core.model.decoder import DecodeBlock
from hmgdm_core.model.masking import draw_mask
from hmgdm_core.train import build_model, make_optimizer, train_steps

CPU = torch.device("cpu")
SMALL = {
    "model.hidden": 32,
    "model.encoder_layers": 2,
    "model.heads": 2,
    "model.ae_hidden": 32,
    "model.window_channels": 4,
    "diffusion.timesteps": 100,
    "model.readout": "mean",
}


# The paper's stage 2 (configs/paper.toml): visible-only encoder, raw latents, sigmoid betas.
PAPER_STAGE2 = {
    "diffusion.encoder_input": "visible",
    "diffusion.standardise_latents": False,
    "diffusion.schedule": "sigmoid",
    "diffusion.timestep_range": (0.0, 1.0),
    "diffusion.node_loss": "mse",
}


def _model(graphs, **overrides):
    cfg = load_config(overrides={**SMALL, **overrides})
    model = build_model(cfg, graph_dims(graphs))
    model.stats.set(stats_from_moments(feature_moments(graphs)))
    return model


def _graphs(n=4, nodes=30):
    return [random_region_graph(nodes + 3 * i, seed=i) for i in range(n)]


def _record_encoder(model):
    seen = []
    model.encoder.register_forward_hook(lambda m, args, out: seen.append(out))
    return seen


@pytest.mark.parametrize(
    ("encoder_input", "teacher"), [("visible", 0.0), ("mask_token", 0.0), ("mask_token", 1.0)]
)
def test_encoder_never_sees_masked_features(encoder_input, teacher):
    graphs = _graphs()
    model = _model(graphs, **{"diffusion.masking": "bfs", "diffusion.encoder_input": encoder_input,
                              "diffusion.teacher_weight": teacher})  # fmt: skip
    batch = Batch.from_data_list(graphs)
    sizes = torch.bincount(batch.batch)
    d = model  # mask drawn exactly as the loss draws it: first use of a fresh generator
    masked = draw_mask(
        sizes,
        batch.batch,
        batch.edge_index,
        ratio_range=d.mask_ratio,
        fixed_ratio=d.fixed_ratio,
        strategy=d.masking,
        num_seeds=d.bfs_seeds,
        generator=torch.Generator().manual_seed(7),
    )
    touched = masked[batch.edge_index].any(0)  # edges with a masked endpoint
    perturbed = batch.clone()
    perturbed.x[masked] += 100.0
    perturbed.win[masked] = 255 - perturbed.win[masked]
    perturbed.edge_attr[touched] -= 50.0
    perturbed.edge_win[touched] = 0
    seen = _record_encoder(model)
    loss_a = model.loss(batch, stage="diffusion", generator=torch.Generator().manual_seed(7))
    loss_b = model.loss(perturbed, stage="diffusion", generator=torch.Generator().manual_seed(7))
    for a, b in zip(seen[0], seen[1], strict=True):
        assert torch.equal(a, b)
    # The paper's encoder gets the visible subgraph; with mask tokens it gets every entity.
    rows = int((~masked).sum()) if encoder_input == "visible" else batch.num_nodes
    assert seen[0][-1].shape[0] == rows
    # The perturbation does reach the (masked) reconstruction target, and the teacher's.
    assert not torch.isclose(loss_a["loss"], loss_b["loss"])
    if teacher:
        assert not torch.isclose(loss_a["teacher"], loss_b["teacher"])


def test_encode_is_deterministic_and_sees_every_node():
    graphs = _graphs()
    model = _model(graphs)
    batch = Batch.from_data_list(graphs)
    nodes_a, pooled_a = model.encode(batch)
    nodes_b, pooled_b = model.encode(batch)
    assert torch.equal(nodes_a, nodes_b) and torch.equal(pooled_a, pooled_b)
    assert nodes_a.shape == (batch.num_nodes, 32) and pooled_a.shape == (4, 32)
    _, single_pooled = model.encode(graphs[0])
    assert torch.allclose(single_pooled[0], pooled_a[0], atol=1e-5)


def test_layers_readout_concatenates_input_and_every_layer_mean():
    graphs = _graphs()
    batch = Batch.from_data_list(graphs)
    nodes_mean, pooled_mean = _model(graphs).encode(batch)
    model = _model(graphs, **{"model.readout": "layers"})
    nodes, pooled = model.encode(batch)
    assert torch.equal(nodes, nodes_mean)  # node embeddings do not depend on the readout
    layers = model.encoder.num_layers
    assert pooled.shape == (4, (layers + 1) * 32)
    assert torch.allclose(pooled[:, -32:], pooled_mean, atol=1e-6)
    # The first block is the input projection: mean-pooling commutes with the linear map.
    z, _ = model.latents(batch)
    h_in = torch.cat([z, model.pos_encoding(batch.pos, batch.batch)], dim=-1)
    first = model.encoder.input(h_in)[batch.batch == 1].mean(0)
    assert torch.allclose(pooled[1, :32], first, atol=1e-5)


def test_layers_std_readout_appends_each_blocks_spread_over_the_graph():
    graphs = _graphs()
    batch = Batch.from_data_list(graphs)
    _, means = _model(graphs, **{"model.readout": "layers"}).encode(batch)
    model = _model(graphs, **{"model.readout": "layers_std"})
    _, pooled = model.encode(batch)
    assert pooled.shape == (4, 2 * means.shape[1])
    assert torch.allclose(pooled[:, : means.shape[1]], means, atol=1e-6)
    last = model.encoder(
        torch.cat([model.latents(batch)[0], model.pos_encoding(batch.pos, batch.batch)], -1),
        batch.edge_index, edge_attr=model.latents(batch)[1], batch=batch.batch,
    )[-1]  # fmt: skip
    std = last[batch.batch == 2].std(0, unbiased=False)
    assert torch.allclose(pooled[2, -32:], std, atol=1e-4)


def _overfit(model, graphs, stage, steps=40):
    opt = make_optimizer(model, load_config().train, stage)
    gen = torch.Generator().manual_seed(0)
    batch = Batch.from_data_list(graphs)
    losses = []
    for _ in range(steps):
        loss = model.loss(batch, stage=stage, generator=gen)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("design", ["default", "paper"])
def test_both_stages_reduce_their_loss_on_a_tiny_set(design):
    torch.manual_seed(0)
    graphs = _graphs(n=3)
    model = _model(graphs, **(PAPER_STAGE2 if design == "paper" else {}))
    ae = _overfit(model, graphs, "autoencoder")
    # Pixel reconstruction of these noise windows cannot be learned, only the descriptors.
    assert sum(ae[-5:]) < 0.85 * sum(ae[:5])
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("autoencoder.")}
    diff = _overfit(model, graphs, "diffusion")
    # The default's task (masked entities nearly pure noise, cosine error) stays harder.
    assert sum(diff[-5:]) < (0.6 if design == "paper" else 0.9) * sum(diff[:5])
    # Stage 2 leaves the stage-1 autoencoder untouched.
    for key, value in frozen.items():
        assert torch.equal(model.state_dict()[key], value)


def test_no_edge_latents_ablation_drops_edge_parts():
    graphs = _graphs()
    full, ablated = _model(graphs), _model(graphs, **{"model.edge_latents": False})
    batch = Batch.from_data_list(graphs)
    gen = torch.Generator().manual_seed(0)
    assert "edge_mse" in full.loss(batch, stage="diffusion", generator=gen)
    assert "edge_mse" not in ablated.loss(batch, stage="diffusion", generator=gen)
    assert not any(k.startswith("autoencoder.edge") for k in ablated.state_dict())


def _decoder_contexts(model, batch):
    contexts, states = [], []
    model.encoder.register_forward_hook(lambda m, a, out: states.append(out))
    for block in model.decoder.blocks:
        block.register_forward_pre_hook(lambda m, args: contexts.append(args[3]))
    model.loss(batch, stage="diffusion", generator=torch.Generator().manual_seed(0))
    return contexts, states[0]


def test_skip_connections_pair_decoder_block_i_with_encoder_layer_l_minus_i():
    graphs = _graphs()
    batch = Batch.from_data_list(graphs)
    visible = {"model.encoder_layers": 3, "diffusion.encoder_input": "visible"}
    model = _model(graphs, **visible)
    contexts, states = _decoder_contexts(model, batch)
    assert isinstance(model.decoder.blocks[0], DecodeBlock)
    vis_batch = None
    for i, ctx in enumerate(contexts):
        # Visible nodes are the rows the encoder saw; recover their batch from the dense mask.
        layer = states[len(states) - 1 - i]
        if vis_batch is None:
            vis_batch = torch.repeat_interleave(
                torch.arange(ctx.shape[0]), (ctx.abs().sum(-1) > 0).sum(1)
            )
        assert torch.equal(ctx, to_dense_batch(layer, vis_batch, batch_size=ctx.shape[0])[0])
    ablated = _model(graphs, **visible, **{"model.skip_connections": False})
    contexts, states = _decoder_contexts(ablated, batch)
    last = to_dense_batch(states[-1], vis_batch, batch_size=contexts[0].shape[0])[0]
    assert all(torch.equal(ctx, last) for ctx in contexts)


def test_fixed_timestep_ablation_gives_every_token_the_same_noise_level():
    graphs = _graphs()
    batch = Batch.from_data_list(graphs)
    for fixed, expect_single in ((17, True), (None, False)):
        model = _model(graphs, **{"diffusion.fixed_timestep": fixed})
        seen: list[torch.Tensor] = []
        model.decoder.time.register_forward_pre_hook(
            lambda m, args, seen=seen: seen.append(args[0])
        )
        model.loss(batch, stage="diffusion", generator=torch.Generator().manual_seed(0))
        values = set(torch.cat(seen).tolist())
        assert (values == {17}) if expect_single else len(values) > 1


def test_epsilon_prediction_targets_the_noise():
    graphs = _graphs()
    batch = Batch.from_data_list(graphs)
    x0 = _model(graphs)
    eps = _model(graphs, **{"diffusion.prediction": "epsilon"})
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    # Same weights, same draws: only the regression target differs.
    assert not torch.isclose(
        x0.loss(batch, stage="diffusion", generator=gen())["node_mse"],
        eps.loss(batch, stage="diffusion", generator=gen())["node_mse"],
    )


def test_swap_context_gives_every_graph_another_graphs_visible_states():
    from hmgdm_core.model.hmgdm import swap_context

    visible_batch = torch.tensor([0, 0, 1, 2, 2, 2])
    states = [torch.arange(6.0)[:, None]]
    swapped = swap_context(states, visible_batch, num_graphs=3)
    # Graph 1 now reads graph 0's rows, graph 2 graph 1's, graph 0 graph 2's; sorted by graph.
    assert swapped["visible_batch"].tolist() == [0, 0, 0, 1, 1, 2]
    assert swapped["states"][0].view(-1).tolist() == [3.0, 4.0, 5.0, 0.0, 1.0, 2.0]
    alone = swap_context(states, torch.zeros(6, dtype=torch.long), num_graphs=1)
    assert not alone["states"][0].any()  # no other graph: the null context is zeros


def test_context_gain_is_zero_exactly_when_the_decoder_cannot_read_the_encoder():
    graphs = _graphs()
    batch = Batch.from_data_list(graphs)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    reads = _model(graphs)
    terms = reads.loss(batch, stage="diffusion", generator=gen(), diagnose=True)
    assert float(terms["context_gain"]) != 0.0 and float(terms["target_var"]) > 0
    blind = _model(graphs, **PAPER_STAGE2, **{"model.self_attn_layers": 0})
    for block in blind.decoder.blocks:  # cross-attention outputs nothing: context unused
        torch.nn.init.zeros_(block.cross.out_proj.weight)
        torch.nn.init.zeros_(block.cross.out_proj.bias)
    terms = blind.loss(batch, stage="diffusion", generator=gen(), diagnose=True)
    assert float(terms["context_gain"]) == 0.0
    assert "context_gain" not in reads.loss(batch, stage="diffusion", generator=gen())


def test_standardised_latents_make_the_masked_targets_unit_variance():
    graphs = _graphs()
    batch = Batch.from_data_list(graphs)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    raw = _model(graphs, **{"diffusion.standardise_latents": False}).loss(
        batch, stage="diffusion", generator=gen(), diagnose=True
    )
    unit = _model(graphs, **{"diffusion.standardise_latents": True}).loss(
        batch, stage="diffusion", generator=gen(), diagnose=True
    )
    # An untrained VAE's latents are tiny; standardised, the masked rows (a ~60% sample of the
    # batch's rows) have about unit variance.
    assert float(raw["target_var"]) < 0.1
    assert 0.6 < float(unit["target_var"]) < 1.4


def test_timestep_range_draws_only_from_its_share_of_the_schedule():
    graphs = _graphs(n=8)
    batch = Batch.from_data_list(graphs)
    model = _model(graphs, **{"diffusion.timestep_range": (0.8, 1.0)})
    seen: list[torch.Tensor] = []
    model.decoder.time.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    for seed in range(5):
        model.loss(batch, stage="diffusion", generator=torch.Generator().manual_seed(seed))
    drawn = torch.cat(seen)
    assert int(drawn.min()) >= 80 and int(drawn.max()) <= 99  # T = 100


def test_scaled_cosine_error_is_the_node_loss_and_mse_is_still_reported():
    graphs = _graphs()
    batch = Batch.from_data_list(graphs)
    model = _model(graphs, **{"diffusion.node_loss": "sce", "model.edge_latents": False})
    terms = model.loss(batch, stage="diffusion", generator=torch.Generator().manual_seed(0))
    assert 0.0 <= float(terms["loss"]) <= 2.0**2  # (1 - cos)^gamma, gamma 2
    assert not torch.isclose(terms["loss"], terms["node_mse"])


def test_two_view_invariance_trains_the_encoder_and_a_private_projector():
    graphs = _graphs()
    batch = Batch.from_data_list(graphs)
    model = _model(graphs, **{"diffusion.invariance_weight": 0.1})
    terms = model.loss(batch, stage="diffusion", generator=torch.Generator().manual_seed(0))
    assert float(terms["invariance"]) > 0
    terms["invariance"].backward()
    assert model.encoder.input.weight.grad.abs().sum() > 0
    assert model.projector[0].weight.grad.abs().sum() > 0
    trained = make_optimizer(model, load_config().train, "diffusion").param_groups[0]["params"]
    assert any(p is model.projector[0].weight for p in trained)


def test_teacher_targets_train_encoder_and_predictor_but_never_the_teacher():
    graphs = _graphs()
    batch = Batch.from_data_list(graphs)
    model = _model(graphs, **{"diffusion.teacher_weight": 1.0})
    terms = model.loss(batch, stage="diffusion", generator=torch.Generator().manual_seed(0))
    assert 0.0 < float(terms["teacher"]) <= 2.0**2
    terms["teacher"].backward()
    assert model.encoder.input.weight.grad.abs().sum() > 0
    assert model.predictor[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.teacher.parameters())
    trained = make_optimizer(model, load_config().train, "diffusion").param_groups[0]["params"]
    assert any(p is model.predictor[0].weight for p in trained)
    assert not any(p is q for p in trained for q in model.teacher.parameters())
    shared = shared_names(model.state_dict(), FederationConfig().shared_prefixes("diffusion"))
    assert shared and not any(n.startswith(("teacher.", "predictor.")) for n in shared)


def test_update_teacher_is_an_ema_of_the_encoder_applied_after_each_stage2_step():
    graphs = _graphs()
    model = _model(graphs, **{"diffusion.teacher_weight": 1.0, "diffusion.teacher_momentum": 0.9})
    pairs = list(zip(model.teacher.parameters(), model.encoder.parameters(), strict=True))
    assert all(torch.equal(t, s) for t, s in pairs)
    before = [t.clone() for t in model.teacher.parameters()]
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    model.update_teacher()
    for old, (t, s) in zip(before, pairs, strict=True):
        torch.testing.assert_close(t, 0.9 * old + 0.1 * s)
    cfg = load_config(overrides={**SMALL, "diffusion.teacher_weight": 1.0})
    frozen = [t.clone() for t in model.teacher.parameters()]
    for stage, moves in (("autoencoder", False), ("diffusion", True)):
        opt = make_optimizer(model, cfg.train, stage)
        gen = torch.Generator().manual_seed(0)
        train_steps(model, opt, graphs, cfg.train, stage=stage, steps=2, device=CPU, generator=gen)
        now = model.teacher.parameters()
        assert any(not torch.equal(a, b) for a, b in zip(frozen, now, strict=True)) is moves


def test_teacher_needs_the_mask_token_encoder():
    with pytest.raises(ConfigError, match="teacher_weight > 0 needs encoder_input"):
        load_config(
            overrides={"diffusion.teacher_weight": 1.0, "diffusion.encoder_input": "visible"}
        )
