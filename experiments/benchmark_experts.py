"""One MoE layer's expert paths head to head (capacity, ragged_dot, blocks of G rows): forward +
backward time and XLA's FLOPs against the model's, to choose the dropless path and its block size.

    python experiments/benchmark_experts.py [--batch=8 --tokens=256 --d_model=128 --d_ff=512] \
        [--experts=16 --top_k=1 --block_rows=16,32,64,128 --capacity_factor=2 --repeats=10]

Prints a Markdown table (`fedmoe_jax.tools.benchmarks.expert_paths`).
"""

from absl import app, flags

from fedmoe_jax.cli_common import fail, flags_parser

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 8, "B: sequences per step.")
flags.DEFINE_integer("tokens", 256, "T: tokens per sequence.")
flags.DEFINE_integer("d_model", 128, "D.")
flags.DEFINE_integer("d_ff", 512, "F.")
flags.DEFINE_integer("experts", 16, "E.")
flags.DEFINE_integer("top_k", 1, "K.")
flags.DEFINE_list("block_rows", ["0", "8", "16", "32", "64"],
                  "Block sizes G of the block path (0: automatic).")
flags.DEFINE_float("capacity_factor", 2.0, "The capacity path's factor.")
flags.DEFINE_integer("repeats", 10, "Timed runs per path (the median is reported).")


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; pass options as --flag=value")
    try:
        blocks = [int(g) for g in FLAGS.block_rows]
    except ValueError:
        fail(f"--block_rows={','.join(FLAGS.block_rows)} must be integers, e.g. --block_rows=32,64")
    sizes = (FLAGS.batch, FLAGS.tokens, FLAGS.d_model, FLAGS.d_ff, FLAGS.experts, FLAGS.top_k, FLAGS.repeats)
    if min(sizes) < 1:
        fail("every size must be >= 1")
    if min(blocks) < 0:
        fail(f"--block_rows={','.join(FLAGS.block_rows)}: use sizes >= 1, or 0 for the automatic one")
    import jax

    from fedmoe_jax.tools.benchmarks.expert_paths import markdown, time_paths

    results = time_paths(FLAGS.batch, FLAGS.tokens, FLAGS.d_model, FLAGS.d_ff, FLAGS.experts, FLAGS.top_k,
                         blocks, FLAGS.capacity_factor, FLAGS.repeats)
    title = (f"B={FLAGS.batch} T={FLAGS.tokens} D={FLAGS.d_model} F={FLAGS.d_ff} E={FLAGS.experts} "
             f"K={FLAGS.top_k}, {jax.device_count()} x {jax.devices()[0].platform}")
    print(markdown(results, title))


if __name__ == "__main__":
    app.run(main, flags_parser=flags_parser())
