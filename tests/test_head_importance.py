"""Head importance (Michel et al. 2019): gate gradients against central finite differences in fp64, known answers
for a silent head and the per-layer normalisation, ablation and pruning curves whose pruned models equal masking,
and `course-transformer analyze heads` end to end on a saved tiny translation model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import modeling
from evaluation import head_importance as hi
from tests.conftest import WORDS, build_tokenizer, tiny_config, tiny_model

TOL = 1e-5  # fp32: pruning drops rows and columns, so pruned and masked outputs differ by rounding alone


def batch_for(model, seed: int = 3, batch: int = 3, length: int = 9) -> dict:
    """Seeded token ids and labels (the last row's labels padded with -100) for any architecture."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (batch, length), generator=gen)
    labels = torch.randint(3, 64, (batch, 6 if model.config.is_encoder_decoder else length), generator=gen)
    if not model.config.is_encoder_decoder:
        labels = ids.clone()
    labels[-1, -2:] = -100
    return {"input_ids": ids, "labels": labels}


@pytest.mark.parametrize("architecture", ["encoder", "decoder", "encoder-decoder"])
def test_gate_gradient_matches_central_differences_in_fp64(architecture):
    """(L(ξ + ε e_h) - L(ξ - ε e_h)) / 2ε against autograd for every gate, at ξ = 1 with one head already at 0.

    fp64 under sdpa, ε = 1e-3: the central difference's truncation error (ε²/6 |L'''|) and rounding (~1e-16 |L| / ε)
    measured ≤ 1.3e-12 here, so 1e-9 is tight (the gradients are ~1e-3: an error of 0.1% would fail). The eager
    path is not used: its softmax runs in fp32 even for fp64 inputs, which leaves ~1e-7 of noise."""
    model = tiny_model(architecture, attn_implementation="sdpa", decoder_start_token_id=1).double()
    batch = batch_for(model)
    first = next(iter(hi.head_groups(model)))
    at = hi.gates(model, removed=[(first, 0, 1)])
    grads = hi.gate_gradient(model, batch, at)
    assert all(g.dtype == torch.float64 for g in grads.values())
    eps = 1e-3

    def loss(group: str, layer: int, head: int, delta: float) -> float:
        moved = {g: t.clone() for g, t in at.items()}
        moved[group][layer, head] += delta
        with torch.no_grad():
            return float(hi.lm_loss(model, batch, hi.forward_masks(model, moved))[0])

    for group, grad in grads.items():
        for layer in range(grad.shape[0]):
            for head in range(grad.shape[1]):
                numeric = (loss(group, layer, head, eps) - loss(group, layer, head, -eps)) / (2 * eps)
                assert abs(numeric - float(grad[layer, head])) < 1e-9, (group, layer, head)
    assert max(float(g.abs().max()) for g in grads.values()) > 1e-4  # the check is not comparing zeros


def pair_batch(seed: int = 5, batch: int = 4, length: int = 7) -> dict:
    """Two sides of seeded token rows, the second side's last row padded, for the in-batch contrastive loss."""
    gen = torch.Generator().manual_seed(seed)
    sides = {}
    for name in ("a", "b"):
        ids = torch.randint(3, 64, (batch, length), generator=gen)
        mask = torch.ones_like(ids)
        if name == "b":
            mask[-1, -3:] = 0
        sides[name] = {"input_ids": ids, "attention_mask": mask}
    return sides


def test_embedding_gate_gradient_matches_central_differences_in_fp64():
    """The same check for a bare encoder under the paraphrase loss (mean pooling, cosine, in-batch softmax)."""
    model = modeling.CourseTransformerModel(tiny_config("encoder", add_pooling_layer=False)).double().eval()
    model.config._attn_implementation = "sdpa"
    loss_fn, batch, eps = hi.paraphrase_loss(), pair_batch(), 1e-3
    at = hi.gates(model)
    grad = hi.gate_gradient(model, batch, at, loss_fn)["encoder.self"]

    def loss(layer: int, head: int, delta: float) -> float:
        moved = {"encoder.self": at["encoder.self"].clone()}
        moved["encoder.self"][layer, head] += delta
        with torch.no_grad():
            return float(loss_fn(model, batch, hi.forward_masks(model, moved))[0])

    for layer, head in np.ndindex(grad.shape):
        numeric = (loss(layer, head, eps) - loss(layer, head, -eps)) / (2 * eps)
        assert abs(numeric - float(grad[layer, head])) < 1e-9, (layer, head)
    assert float(grad.abs().max()) > 1e-4


def test_retrieval_metric_known_answers():
    """Identical sides retrieve themselves (1.0); sides whose pairs are rotated by one retrieve none (0.0)."""
    torch.manual_seed(0)
    model = modeling.CourseTransformerModel(tiny_config("encoder", add_pooling_layer=False)).eval()
    same = pair_batch()
    same["b"] = same["a"]
    assert hi.retrieval_metric([same])(model, {}) == 1.0
    rotated = {"a": same["a"], "b": {k: v.roll(1, dims=0) for k, v in same["a"].items()}}
    assert hi.retrieval_metric([rotated])(model, {}) == 0.0
    loss, pairs = hi.paraphrase_loss()(model, same, {})
    assert pairs == 4 and loss.item() < hi.paraphrase_loss()(model, rotated, {})[0].item()


def silenced(architecture: str, layer: int, head: int):
    """A tiny model whose head `head` of self-attention layer `layer` writes nothing (its W_O columns are 0)."""
    model = tiny_model(architecture, decoder_start_token_id=1)
    stack = model.model.encoder if architecture != "decoder" else model.model.decoder
    attn = stack.layers[layer].self_attn
    with torch.no_grad():
        attn.o_proj.weight[:, head * attn.head_dim : (head + 1) * attn.head_dim] = 0.0
    return model


def test_silent_head_has_zero_importance_and_zero_ablation_delta():
    model = silenced("encoder-decoder", 1, 2)
    batches = [batch_for(model, seed) for seed in range(3)]
    scores = hi.head_importance(model, batches)
    assert float(scores["encoder.self"][1, 2]) == 0.0  # ∂L/∂ξ = W_O-column term, exactly zero
    assert hi.rank_heads(scores)[0] == ("encoder.self", 1, 2)
    base, deltas = hi.ablation_deltas(model, hi.loss_metric(batches), groups=["encoder.self"])
    assert float(deltas["encoder.self"][1, 2]) == 0.0
    assert float(deltas["encoder.self"].abs().max()) > 1e-6  # other heads change the loss (fp32 ulp here: 5e-7)


def test_normalize_by_layer_known_values():
    scores = {"encoder.self": torch.tensor([[3.0, 4.0], [0.0, 0.0]]), "decoder.cross": torch.tensor([[1.0, 0.0]])}
    out = hi.normalize_by_layer(scores)
    assert torch.equal(out["encoder.self"], torch.tensor([[0.6, 0.8], [0.0, 0.0]]))
    assert torch.equal(out["decoder.cross"], torch.tensor([[1.0, 0.0]]))


def test_importance_is_token_weighted_mean_of_absolute_gradients():
    """With one example per batch, E_x |∂L/∂ξ| weighted by target tokens; order of batches does not matter."""
    model = tiny_model("decoder")
    rows = [batch_for(model, seed, batch=1, length=n) for seed, n in ((0, 5), (1, 9), (2, 7))]
    raw = hi.head_importance(model, rows, normalize=False)["decoder.self"]
    tokens = [int((b["labels"][:, 1:] != -100).sum()) for b in rows]
    expected = sum(t * hi.gate_gradient(model, b, hi.gates(model))["decoder.self"].abs() for t, b in zip(tokens, rows))
    assert (raw - expected / sum(tokens)).abs().max() < 1e-7  # fp32 sums of ~1e-3 values
    assert (hi.head_importance(model, rows[::-1], normalize=False)["decoder.self"] - raw).abs().max() < 1e-7


def test_pruning_curve_follows_the_scores_and_pruned_models_equal_masking():
    model = tiny_model("encoder-decoder", decoder_start_token_id=1)
    batches = [batch_for(model, seed) for seed in range(2)]
    fixed = {
        "encoder.self": torch.tensor([[0.9, 0.1, 0.5, 0.8], [0.3, 0.7, 0.2, 0.6]]),
        "decoder.cross": torch.tensor([[0.05, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.4]]),
    }
    points = hi.pruning_curve(
        model, hi.loss_metric(batches), lambda removed: fixed, [0, 2, 5, 16], check_at=[5, 16], check_batch=batches[0]
    )
    assert [p["removed"] for p in points] == [0, 2, 5, 16]
    expected = [["decoder.cross", 0, 0], ["encoder.self", 0, 1], ["encoder.self", 1, 2], ["encoder.self", 1, 0]]
    assert points[2]["heads"][:4] == expected and points[2]["heads"][4] == ["decoder.cross", 1, 3]
    assert points[0]["metric"] == pytest.approx(hi.loss_metric(batches)(model, {}), abs=1e-6)
    for point in points[2:]:
        assert point["max_abs_logit_diff"] < TOL
        assert abs(point["pruned_metric"] - point["metric"]) < TOL
    assert points[3]["pruned_parameters"] < points[2]["pruned_parameters"] < model.num_parameters()
    with pytest.raises(ValueError, match="strictly increasing"):
        hi.pruning_curve(model, hi.loss_metric(batches), lambda removed: fixed, [2, 1])
    with pytest.raises(ValueError, match=r"counts must lie in \[0, 16\]"):
        hi.pruning_curve(model, hi.loss_metric(batches), lambda removed: fixed, [0, 17])


def test_recomputed_importance_is_taken_at_the_current_mask():
    model = tiny_model("decoder")
    batches = [batch_for(model, seed) for seed in range(2)]
    seen = []

    def score(removed):
        seen.append(list(removed))
        return hi.head_importance(model, batches, removed)

    points = hi.pruning_curve(model, hi.loss_metric(batches), score, [0, 2, 4], recompute=True)
    assert seen[0] == [] and [len(s) for s in seen] == [0, 2]  # once at the start, once before the second step
    assert seen[1] == [tuple(h) for h in points[1]["heads"]]
    second = hi.head_importance(model, batches, seen[1])
    assert all(float(second["decoder.self"][layer, head]) == 0.0 for _, layer, head in seen[1])
    assert [tuple(h) for h in points[2]["heads"][2:]] == hi.rank_heads(second, seen[1])[:2]


def translator(tokenizer, seed: int = 4):
    """A random tiny encoder-decoder whose greedy output depends on its source: weights at std 0.2 (at 0.02 every
    source gives the same tokens), special tokens and ids beyond the tokenizer suppressed (no empty outputs)."""
    model = tiny_model("encoder-decoder", decoder_start_token_id=1, seed=seed, initializer_range=0.2)
    model.generation_config.suppress_tokens = [*tokenizer.all_special_ids, *range(len(tokenizer), 64)]
    return model


def test_masked_translation_equals_the_pruned_model():
    tokenizer = build_tokenizer()
    model = translator(tokenizer)
    sources = ["the cat sat on the mat .", "a dog ran to the park", "the pizza came out of the oven"]
    removed = [("encoder.self", 0, 1), ("encoder.self", 1, 3), ("decoder.cross", 0, 2)]
    masks = hi.forward_masks(model, hi.gates(model, removed))
    masked = hi.translate(model, tokenizer, sources, masks, max_new_tokens=8)
    assert masked != hi.translate(model, tokenizer, sources, max_new_tokens=8)  # the masks do change the output
    assert hi.translate(hi.pruned_copy(model, removed), tokenizer, sources, max_new_tokens=8) == masked
    metric = hi.bleu_metric(tokenizer, sources, sources, max_new_tokens=8)
    assert metric(model, masks) == metric(hi.pruned_copy(model, removed), {})


def test_bad_groups_and_architectures_are_named():
    model = tiny_model("decoder")
    with pytest.raises(ValueError, match="groups contains 'decoder.cross'; this model's groups are decoder.self"):
        hi.gates(model, groups=["decoder.cross"])
    with pytest.raises(ValueError, match="needs as many sources as references"):
        hi.bleu_metric(build_tokenizer(), ["a"], [])


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A saved tiny translation model, its tokenizer and a two-split dataset, laid out like a training run."""
    from datasets import Dataset, DatasetDict

    root = tmp_path_factory.mktemp("run")
    tokenizer = build_tokenizer()
    translator(tokenizer, seed=2).save_pretrained(root / "final")  # the generation config travels with it
    tokenizer.save_pretrained(root / "final")
    gen = torch.Generator().manual_seed(0)
    vocab = sorted(set(WORDS))

    def rows(n: int) -> dict:
        sentences = [
            " ".join(vocab[int(i)] for i in torch.randint(0, len(vocab), (6,), generator=gen)) for _ in range(n)
        ]
        return {"en": sentences, "fr": [s.upper().lower() for s in sentences]}

    DatasetDict({"validation": Dataset.from_dict(rows(6)), "test": Dataset.from_dict(rows(8))}).save_to_disk(
        root / "data"
    )
    return root


def test_analyze_heads_command_writes_a_consistent_report(saved_run, capsys):
    from course_transformer.commands import analyze

    out = saved_run / "heads"
    argv = ["heads", str(saved_run / "final"), "--dataset", str(saved_run / "data"), "--out", str(out)]
    argv += ["--groups", "encoder.self", "--examples", "8", "--importance-examples", "6", "--max-new-tokens", "6"]
    assert analyze.main([*argv, "--random-seed", "0", "--check-pruned", "4,8"]) == 0
    assert {p.name for p in out.iterdir()} == {"heads.json", "heads.md", "importance.png", "pruning_curve.png"}
    report = json.loads((out / "heads.json").read_text())
    curve = report["curves"]["importance"]
    assert [p["removed"] for p in curve] == list(range(9)) and report["metric"] == "bleu"
    assert report["ablation"]["base"] == curve[0]["metric"]  # both: BLEU of the unmasked model on the same rows
    assert [tuple(h) for h in curve[-1]["heads"]] == [tuple(h) for h in report["order"]]
    for point in (curve[4], curve[8]):
        assert point["pruned_metric"] == point["metric"] and point["max_abs_logit_diff"] < TOL
    assert len(report["curves"]["random"]) == 9 and report["examples"] == 8
    assert "| layer | head 1 |" in (out / "heads.md").read_text()
    # a second run refuses to overwrite; bad arguments name themselves
    assert analyze.main(argv) == 2 and "exists; pass --overwrite" in capsys.readouterr().err
    assert analyze.main([*argv[:-8], "--out", str(saved_run / "x"), "--groups", "encoder.cross"]) == 2
    assert "--groups: groups contains 'encoder.cross'" in capsys.readouterr().err
    assert analyze.main([*argv[:-8], "--out", str(saved_run / "y"), "--check-pruned", "99"]) == 2
    assert "--check-pruned 99 is not a point of the curve" in capsys.readouterr().err


def test_cached_generation_of_a_model_without_heads_in_decoder_layer_0():
    """Layer 0's cache must keep counting with no heads (transformers reads the length there): positions must not
    restart at 0 at each step."""
    model = translator(build_tokenizer())
    removed = [("decoder.self", 0, head) for head in range(4)]
    ids = torch.randint(3, 36, (2, 7), generator=torch.Generator().manual_seed(0))

    def scores(m, **kwargs) -> torch.Tensor:
        out = m.generate(
            ids, max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True, **kwargs
        )
        return torch.stack(out.scores).clamp_min(-1e4)  # (steps, B, V); suppressed tokens are -inf

    masked = scores(model, **hi.forward_masks(model, hi.gates(model, removed)))
    assert (scores(hi.pruned_copy(model, removed)) - masked).abs().max() < TOL
