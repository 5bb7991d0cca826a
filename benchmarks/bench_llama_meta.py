"""Issue 11, scale: a LlamaForCausalLM with a 7B configuration on the meta device, traced, grouped and narrowed.

hidden 4096, intermediate 11008, 32 layers, 32 heads, built under
``torch.device("meta")``: no real weight is ever allocated. The script traces
it (the export path), finds the gate/up group of every MLP and narrows each
by 25% with ``fxindex.resize(..., keep=..., inplace=True)``, then prints the
wall time of each step and the process's peak RSS (the issue asks for ≤ 60 s
and ≤ 3 GB on the 2-core machine), and checks that every parameter is still
on meta.

Run: ``python benchmarks/bench_llama_meta.py`` (``--layers N`` for fewer layers).
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

import fxindex

try:
    import common
except ImportError:  # imported as benchmarks.bench_llama_meta
    from benchmarks import common

NAME = "bench_llama_meta"


def main() -> None:
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="2 layers")
    common.add_output_argument(parser, NAME)
    args = parser.parse_args()
    layers = 2 if args.quick else args.layers
    started = time.perf_counter()
    config = transformers.LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config).eval()
    built = time.perf_counter()
    ids = torch.zeros(1, 16, dtype=torch.long, device="meta")
    gm = fxindex.trace(model, example_inputs=(ids,))
    traced = time.perf_counter()
    gates = [entry.target for entry in fxindex.index(gm) if entry.target.endswith("mlp.gate_proj")]
    group = fxindex.group(gm, gates[0])
    grouped = time.perf_counter()
    keep = list(range(config.intermediate_size * 3 // 4))
    for name in gates:
        fxindex.resize(gm, name, keep=keep, inplace=True)
    resized = time.perf_counter()
    on_meta = all(p.device.type == "meta" for p in gm.parameters())
    widths = {gm.get_submodule(name).out_features for name in gates}
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    rows = [
        ["build on meta", f"{built - started:.1f} s"],
        [f"trace ({gm.meta.get('fxindex_capture')}) + shapes", f"{traced - built:.1f} s"],
        [f"group of {gates[0]}: producers {', '.join(group.producers)}", f"{grouped - traced:.2f} s"],
        [f"resize {len(gates)} MLPs to {sorted(widths)}", f"{resized - grouped:.1f} s"],
        ["total", f"{resized - started:.1f} s"],
        ["peak RSS", f"{peak_gb:.2f} GB"],
        ["every parameter still on meta", "yes" if on_meta else "NO"],
    ]
    print(common.machine_line())
    print(common.table(rows, ["step", "figure"]))
    elapsed = common.print_elapsed(started)
    common.write_results(args.output, NAME, {"rows": rows, "layers": layers}, quick=args.quick, elapsed=elapsed)


if __name__ == "__main__":
    main()
