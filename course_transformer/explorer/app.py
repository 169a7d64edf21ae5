"""The gradio UI of the explorer: one page, one model at a time (a local, single-user tool).

Every callback returns a dict of component updates; an error becomes a message in the page (`status`), never
a traceback.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field

import gradio as gr
import numpy as np

from course_transformer.explorer import compute, figures
from course_transformer.explorer.loading import ExplorerError, Loaded, encode, labels, load_model

logger = logging.getLogger(__name__)
VIEWS = ("self", "cross", "decoder self")


@dataclass
class Session:
    loaded: Loaded | None = None
    encoded: object = None
    maps: compute.Maps | None = None
    target_ids: object = None  # seq2seq: the decoder input (start + reference tokens), or None
    target_tokens: list[str] = field(default_factory=list)
    induction: dict | None = None
    load_error: str = ""
    base: compute.Prediction | None = None  # the unablated predictions of the current input
    seconds: dict = field(default_factory=dict)


def _shape(loaded: Loaded) -> tuple[int, int]:
    config = loaded.model.config
    layers = getattr(config, "num_hidden_layers", None) or config.num_encoder_layers or config.num_decoder_layers
    return int(layers), int(config.num_attention_heads)


def _pick(session: Session, view: str, layer: int, head: int):
    """(matrix (T, S), query tokens, key tokens) of the chosen view, layer and head (from 1)."""
    maps = session.maps
    source = session.encoded.labels
    if view == "cross" and maps.cross is not None:
        return maps.cross[layer - 1, head - 1], session.target_tokens, source, maps.cross[layer - 1]
    if view == "decoder self" and maps.decoder_self is not None:
        t = session.target_tokens
        return maps.decoder_self[layer - 1, head - 1], t, t, maps.decoder_self[layer - 1]
    return maps.self_attention[layer - 1, head - 1], source, source, maps.self_attention[layer - 1]


def build_app(model: str | None = None, max_tokens: int = 64) -> gr.Blocks:
    session = Session()
    with gr.Blocks(title="Attention explorer") as app:
        gr.Markdown("# Attention explorer\nEvery head of the model, its measures, and what ablating it changes.")
        with gr.Row():
            model_box = gr.Textbox(model or "", label="model (folder, preset or name)", elem_id="model", scale=4)
            load_btn = gr.Button("Load", elem_id="load")
        status = gr.Markdown("", elem_id="status")
        with gr.Row():
            text = gr.Textbox("The pizza came out of the oven and it tasted good.", label="text", elem_id="text")
            pair = gr.Textbox("", label="second sentence, or the target for a translation model", elem_id="pair")
        with gr.Row():
            run_btn = gr.Button("Run", variant="primary", elem_id="run")
            pair_btn = gr.Button("Held-out verse pair (en-fr test split)", elem_id="heldout")
        tokens = gr.HighlightedText(
            label="tokens, as the tokenizer splits them",
            elem_id="tokens",
            combine_adjacent=False,
            show_inline_category=False,
            show_legend=False,
        )
        with gr.Row():
            layer = gr.Slider(1, 12, value=1, step=1, label="layer", elem_id="layer")
            head = gr.Slider(1, 12, value=1, step=1, label="head", elem_id="head")
            view = gr.Radio(list(VIEWS), value="self", label="attention", elem_id="view")
        with gr.Row():
            heat = gr.Plot(label="heatmap", elem_id="heatmap")
            lines = gr.Plot(label="head view", elem_id="headview")
        grid = gr.Plot(label="all heads of the layer", elem_id="grid")
        table = gr.Dataframe(headers=compute.TABLE_HEADERS, label="per-head measures (click a row)", elem_id="table")
        ablate = gr.CheckboxGroup([], label="ablate heads (layer-head)", elem_id="ablate")
        loss = gr.Markdown("", elem_id="loss")
        preds = gr.Dataframe(headers=["token", "probability"], label="predictions", elem_id="preds")
        with gr.Row():
            steps = gr.Slider(1, 20, value=6, step=1, label="generation steps", elem_id="steps")
            gen_btn = gr.Button("Generate step by step", elem_id="generate")
        gen_plot = gr.Plot(label="attention of each new token (chosen layer and head)", elem_id="genplot")

        def safe(fn):
            @functools.wraps(fn)
            def wrapper(*args):
                try:
                    return fn(*args)
                except ExplorerError as error:
                    return {status: f"**Error:** {error}"}
                except Exception as error:  # the page shows one line; the log keeps the traceback
                    logger.exception("explorer callback failed")
                    return {status: f"**Error:** {type(error).__name__}: {' '.join(str(error).split())}"}

            return wrapper

        def views(layer_v, head_v, view_v):
            matrix, queries, keys, whole = _pick(session, view_v, int(layer_v), int(head_v))
            name = f"{view_v} attention, layer {int(layer_v)} head {int(head_v)}"
            out = {
                heat: figures.heatmap(matrix, queries, keys, name),
                lines: figures.head_view(matrix, queries, keys, name),
                grid: figures.head_grid(whole, f"{view_v} attention, layer {int(layer_v)}"),
            }
            return out

        def predictions(ablated):
            loaded = session.loaded
            mask = compute.head_mask(ablated or [], *_shape(loaded))
            if session.base is None:  # the unablated predictions: once per input, then only the ablated ones
                session.base = compute.predict(loaded, session.encoded.batch, None, session.target_ids)
            base = session.base
            pred = base if mask is None else compute.predict(loaded, session.encoded.batch, mask, session.target_ids)
            text_loss = "" if pred.loss is None else f"loss {pred.loss:.4f} (unablated {base.loss:.4f})"
            label = f"{len(ablated or [])} heads ablated; {pred.what}; {text_loss}"
            return {preds: pred.rows, loss: label}

        @safe
        def on_load(name):
            started = time.perf_counter()
            session.loaded, session.load_error = None, ""
            try:
                session.loaded = load_model(name)
            except ExplorerError as error:
                session.load_error = str(error)  # kept: the Run that follows at start-up shows it too
                raise
            session.maps, session.induction = None, None
            compute.warm_up(session.loaded)
            figures.warm_up()
            num_layers, num_heads = _shape(session.loaded)
            session.seconds["load"] = time.perf_counter() - started
            names = [f"{i + 1}-{j + 1}" for i in range(num_layers) for j in range(num_heads)]
            return {
                status: f"Loaded {session.loaded.label} ({session.loaded.kind}, {num_layers} layers x {num_heads} "
                f"heads) in {session.seconds['load']:.1f} s",
                layer: gr.update(maximum=num_layers, value=1),
                head: gr.update(maximum=num_heads, value=1),
                ablate: gr.update(choices=names, value=[]),
            }

        @safe
        def on_run(text_v, pair_v, layer_v, head_v, view_v, ablated):
            if session.loaded is None:
                raise ExplorerError(session.load_error or "no model loaded: enter a model and press Load")
            started = time.perf_counter()
            loaded = session.loaded
            seq2seq = loaded.kind == "seq2seq"
            session.encoded = encode(loaded.tokenizer, text_v, None if seq2seq else pair_v, max_tokens)
            session.target_ids, session.target_tokens = None, []
            if seq2seq:
                session.target_ids = _target_ids(loaded, pair_v, session.encoded.batch, max_tokens)
                session.target_tokens = labels(loaded.tokenizer, session.target_ids[0].tolist())
            out = compute.forward(loaded, session.encoded.batch, None, session.target_ids)
            session.maps = compute.attention_maps(out)
            if loaded.kind == "causal" and session.induction is None:
                session.induction = compute.analysis.induction_scores(loaded.model, loaded.tokenizer, num_sequences=2)
            rows = compute.head_table(
                session.maps.self_attention, session.encoded.tokens, loaded.tokenizer, session.induction
            )
            session.base = None
            result = {**views(layer_v, head_v, view_v), **predictions(ablated)}
            session.seconds["first_view"] = time.perf_counter() - started
            note = session.encoded.note or "Done"
            result.update(
                {
                    tokens: [(t, "token") for t in session.encoded.labels],  # one box per token
                    table: rows,
                    status: f"{note} ({len(session.encoded.tokens)} tokens, {session.seconds['first_view']:.2f} s)",
                }
            )
            return result

        @safe
        def on_view(layer_v, head_v, view_v):
            return views(layer_v, head_v, view_v) if session.maps is not None else {}

        @safe
        def on_ablate(ablated):
            return predictions(ablated) if session.maps is not None else {}

        @safe
        def on_select(evt: gr.SelectData):
            row = evt.row_value if evt.row_value else None
            name = row[0] if row else None
            if not name:
                return {}
            layer_v, head_v = (int(x) for x in str(name).split("-"))
            return {layer: layer_v, head: head_v}

        @safe
        def on_generate(steps_v, layer_v, head_v):
            if session.maps is None:
                raise ExplorerError("press Run first")
            if session.loaded.kind not in ("causal", "seq2seq"):
                raise ExplorerError("step-by-step generation needs a causal or an encoder-decoder model")
            result = compute.generate_steps(session.loaded, session.encoded.batch, int(steps_v))
            matrix = result.rows[int(layer_v) - 1, int(head_v) - 1]  # (N, S)
            title = f"layer {int(layer_v)} head {int(head_v)}: each generated token's attention"
            return {gen_plot: figures.heatmap(matrix, result.tokens, result.keys, title), status: "Generated"}

        @safe
        def on_pair():
            en, fr = compute.held_out_pair()
            return {text: en, pair: fr}

        outputs = [status, layer, head, ablate, tokens, heat, lines, grid, table, preds, loss, gen_plot, text, pair]
        load_btn.click(on_load, [model_box], outputs)
        run_inputs = [text, pair, layer, head, view, ablate]
        run_btn.click(on_run, run_inputs, outputs)
        for control in (layer, head, view):
            control.change(on_view, [layer, head, view], outputs)
        ablate.change(on_ablate, [ablate], outputs)
        table.select(on_select, None, outputs)
        gen_btn.click(on_generate, [steps, layer, head], outputs)
        pair_btn.click(on_pair, None, outputs)
        if model:
            app.load(on_load, [model_box], outputs).then(on_run, run_inputs, outputs)
    app.session = session  # for the tests and the timing script
    return app


def _target_ids(loaded: Loaded, target: str, batch: dict, max_tokens: int):
    """The decoder input: the start token and the reference (teacher forcing), or the greedy translation."""
    import torch

    start = compute.start_ids(loaded)  # (1, 1)
    if target and target.strip():
        ids = loaded.tokenizer(target, truncation=True, max_length=max_tokens, return_tensors="pt")["input_ids"]
        return torch.cat([start, ids[:, :-1]], dim=1)  # (1, T_dec): position t predicts reference token t
    with torch.no_grad():
        generated = loaded.model.generate(
            **{k: batch[k] for k in ("input_ids", "attention_mask")}, do_sample=False, max_new_tokens=max_tokens
        )
    return generated[:, :-1] if generated.shape[1] > 1 else generated


def first_view_seconds(app: gr.Blocks) -> float:
    return float(app.session.seconds.get("first_view", np.nan))
