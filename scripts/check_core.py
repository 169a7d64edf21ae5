"""Measure the model core's agreement figures: sdpa vs eager, cached vs full forward, save/load round trip.

Prints a Markdown table and writes JSON (default `outputs/core_checks.json`). The tests assert the same
properties with a 1e-5 tolerance; this script reports the measured maxima so they can be quoted.

    python scripts/check_core.py [--output outputs/core_checks.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM, DynamicCache

import modeling
from course_transformer.core.io import atomic_write_text

HEADS = {
    "decoder": (modeling.CourseTransformerForCausalLM, AutoModelForCausalLM),
    "encoder": (modeling.CourseTransformerForMaskedLM, AutoModelForMaskedLM),
    "encoder-decoder": (modeling.CourseTransformerForSeq2SeqLM, AutoModelForSeq2SeqLM),
}


def build(arch: str, encoding: str, implementation: str, seed: int = 0):
    config = modeling.load_preset(
        f"tiny-{arch}", position_encoding=encoding, hidden_dropout_prob=0.0, attention_dropout_prob=0.0
    )
    config._attn_implementation = implementation
    torch.manual_seed(seed)
    return HEADS[arch][0](config).eval()


def inputs(model, ids: torch.Tensor, mask: torch.Tensor | None = None, **kwargs) -> dict:
    extra = {"decoder_input_ids": ids[:, :6]} if model.config.is_encoder_decoder else {}
    return {"input_ids": ids, "attention_mask": mask, **extra, **kwargs}


def attention_maps(out) -> list[torch.Tensor]:
    names = ("attentions", "encoder_attentions", "decoder_attentions", "cross_attentions")
    return [w for name in names for w in (getattr(out, name, None) or ())]


@torch.no_grad()
def measure() -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 4096, (4, 48), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    mask[3, :11] = 0
    for arch in HEADS:
        for encoding in ("sinusoidal", "learned", "rope", "alibi"):
            eager, sdpa = build(arch, encoding, "eager"), build(arch, encoding, "sdpa")
            ref = eager(**inputs(eager, ids, mask, output_attentions=True))
            fast = sdpa(**inputs(sdpa, ids, mask))
            fast_w = sdpa(**inputs(sdpa, ids, mask, output_attentions=True))
            row = {
                "architecture": arch,
                "position_encoding": encoding,
                "sdpa_vs_eager_logits": (fast.logits - ref.logits).abs().max().item(),
                "sdpa_vs_eager_attention": max(
                    (a - b).abs().max().item() for a, b in zip(attention_maps(ref), attention_maps(fast_w))
                ),
            }
            # cached incremental decoding vs one full forward
            if arch != "encoder":
                seq = ids[:1, :24]
                if arch == "decoder":
                    full = sdpa(seq).logits
                    cache = DynamicCache(config=sdpa.config)
                    steps = [sdpa(seq[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(24)]
                else:
                    enc = sdpa.get_encoder()(input_ids=ids[:1])
                    full = sdpa(encoder_outputs=enc, decoder_input_ids=seq).logits
                    cache = None
                    steps = []
                    for t in range(24):
                        out = sdpa(encoder_outputs=enc, decoder_input_ids=seq[:, t : t + 1], past_key_values=cache)
                        cache = out.past_key_values
                        steps.append(out.logits)
                row["cached_vs_full_logits"] = (torch.cat(steps, 1) - full).abs().max().item()
            # save -> load
            with tempfile.TemporaryDirectory() as folder:
                sdpa.save_pretrained(folder)
                loaded = HEADS[arch][1].from_pretrained(folder).eval()
                again = loaded(**inputs(loaded, ids, mask))
            row["round_trip_logits"] = (again.logits - fast.logits).abs().max().item()
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="outputs/core_checks.json", help="JSON file to write")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rows = measure()
    keys = ["sdpa_vs_eager_logits", "sdpa_vs_eager_attention", "cached_vs_full_logits", "round_trip_logits"]
    print("| architecture | encoding | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for row in rows:
        cells = [f"{row[k]:.2e}" if k in row else "n/a" for k in keys]
        print(f"| {row['architecture']} | {row['position_encoding']} | " + " | ".join(cells) + " |")
    output = atomic_write_text(args.output, json.dumps({"torch": torch.__version__, "rows": rows}, indent=2))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
