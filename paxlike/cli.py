"""The `paxlike` command: a thin layer of flags over `paxlike.train.trainer.train`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

# TensorFlow only feeds the input pipeline here; keep its C++ start-up chatter off the terminal.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

USAGE_MACROS = """\
gin macros every run file understands (set with --gin.NAME=VALUE):
  TRAIN_STEPS            number of optimizer steps to train to
  BATCH_SIZE             global batch, in sequences (split over data x fsdp x expert)
  SEQ_LEN                tokens per packed sequence
  MIXTURE_OR_TASK_NAME   seqio Task or Mixture to train on (default: default_mixture)
  MESH_SHAPE             dict of mesh axis -> size over data, fsdp, tensor (one may be -1)
  SEED                   seed of parameter init and data order
  CHECKPOINT_EVERY       steps between (async) checkpoints
  LOG_EVERY              steps between metrics.jsonl / TensorBoard records
  MAX_BAD_STEPS          non-finite steps in a row (each skipped) before the run stops
  INIT_FROM              model directory whose parameters start a fresh run (None)
  MODEL_DIR              --model_dir: where checkpoints, metrics and config.gin go
                         (--gin.MODEL_DIR=DIR or a gin file's binding also work)

exit status: 0 done, 2 bad input (nothing written), 3 too many non-finite steps,
  4 a checkpoint could not be written, 75 preempted (SIGTERM; checkpoint saved, rerun to resume)

example:
  paxlike train --model_dir /tmp/run                       # the default job
  paxlike train --gin_file models/tiny_palm.gin --gin_file runs/pretrain.gin \\
      --gin.TRAIN_STEPS=20 --gin.MESH_SHAPE="{'data': 2, 'fsdp': 2, 'tensor': 2}" --model_dir D
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="paxlike", description="Gin-configured JAX pretraining of decoder-only language models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="run 'paxlike train --help' for the training flags and macros")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = commands.add_parser(
        "train", help="train (or resume) a model", epilog=USAGE_MACROS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a model from gin files; rerunning the same command resumes from the "
                    "newest checkpoint in MODEL_DIR. Without --gin_file runs the default job "
                    "(runs/default.gin).")
    train.add_argument("--gin_file", action="append", default=[], metavar="FILE",
                       help="gin file by path or by name under gin/ (repeatable, parsed in order)")
    train.add_argument("--model_dir", help="output directory (sets the MODEL_DIR macro)")
    train.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    params = commands.add_parser(
        "params", help="count a model's parameters from abstract shapes (no memory used)",
        description="Count parameters of the model a gin file describes, e.g. "
                    "paxlike params --gin_file models/palm_540b.gin")
    params.add_argument("--gin_file", action="append", required=True, metavar="FILE",
                        help="model gin file by path or by name under gin/ (repeatable)")
    params.add_argument("--json", action="store_true", help="print one JSON object")

    from paxlike.model.flops import PEAK_FLOPS_BY_HARDWARE

    mfu = commands.add_parser(
        "mfu", help="model FLOPs utilisation of a measured throughput (PaLM Appendix B)",
        description="MFU = tokens/s x model FLOPs per token / (chips x peak FLOP/s). Example "
                    "(PaLM 540B on 6144 TPU v4): paxlike mfu --gin_file models/palm_540b.gin "
                    "--tokens_per_sec 238300 --chips 6144 --hardware tpu_v4")
    mfu.add_argument("--gin_file", action="append", required=True, metavar="FILE",
                     help="model gin file by path or by name under gin/ (repeatable)")
    mfu.add_argument("--tokens_per_sec", type=float, required=True, help="measured throughput")
    mfu.add_argument("--chips", type=int, required=True, help="accelerator chips used")
    mfu.add_argument("--hardware", required=True, choices=sorted(PEAK_FLOPS_BY_HARDWARE),
                     help="chip type, for its peak dense bf16 FLOP/s")
    mfu.add_argument("--seq_len", type=int, help="sequence length (default: the model's max_seq_len)")
    mfu.add_argument("--json", action="store_true", help="print one JSON object")

    evaluate = commands.add_parser(
        "eval", help="perplexity and bits per byte on a seqio Task, or multiple-choice accuracy",
        description="Score a model directory: perplexity and bits per byte on a split of a "
                    "registered seqio Task or Mixture (--task), or zero-/few-shot accuracy on a "
                    "multiple-choice JSONL file (--multiple_choice); see docs/evaluation.md. "
                    "Example: paxlike eval --model_dir D --task default_mixture")
    evaluate.add_argument("--model_dir", required=True, help="a trained or converted model directory")
    subject = evaluate.add_mutually_exclusive_group(required=True)
    subject.add_argument("--task", metavar="NAME", help="seqio Task or Mixture (e.g. default_mixture)")
    subject.add_argument("--multiple_choice", metavar="FILE",
                         help="JSONL: context, choices, gold[, domain_premise] per line")
    evaluate.add_argument("--split", default="validation", help="split of --task (validation)")
    evaluate.add_argument("--max_batches", type=int,
                          help="batches of each Task to score (default: the whole split)")
    evaluate.add_argument("--batch_size", type=int, default=8, help="rows per forward pass (8)")
    evaluate.add_argument("--seq_len", type=int, help="tokens per packed row (--task: 256; "
                          "--multiple_choice: the longest prompt, to a multiple of 64)")
    evaluate.add_argument("--shots", type=int, default=0, help="solved examples before each item")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the examples drawn")
    evaluate.add_argument("--tasks_module", default="paxlike.tasks",
                          help="module imported to register Tasks (paxlike.tasks)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.add_argument("--mesh", metavar="AXIS=SIZE,...",
                          help="score on a device mesh, rows over data and heads over tensor, "
                               "e.g. data=2,tensor=4 (default: one device)")

    generate = commands.add_parser(
        "generate", help="continue prompts: greedy, sampled (temperature, top-k, top-p) or beams",
        description="Generate tokens after prompts with a KV cache; see docs/generation.md. "
                    "Example: paxlike generate --model_dir D --prompt 'def main(' "
                    "--max_new_tokens 64")
    generate.add_argument("--model_dir", required=True,
                          help="a trained or converted model directory")
    prompt = generate.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", action="append", metavar="TEXT",
                        help="a text prompt (repeatable; byte-vocabulary models)")
    prompt.add_argument("--prompt_file", metavar="FILE", help="text prompts, one per line")
    prompt.add_argument("--prompt_ids", action="append", metavar="IDS",
                        help='a prompt as token ids "1,2,3" (repeatable; any model)')
    for flag, kind, default, text in (
            ("--max_new_tokens", int, 32, "tokens after each prompt (32)"),
            ("--temperature", float, 0.0, "0 = greedy (default)"),
            ("--top_k", int, 0, "sample from the k most probable tokens (0: off)"),
            ("--top_p", float, 1.0, "sample from the nucleus of mass p (1: off)"),
            ("--num_samples", int, 1, "continuations per prompt (1)"),
            ("--num_beams", int, 1, "beam search with this many beams (1: off)")):
        generate.add_argument(flag, type=kind, default=default, help=text)
    generate.add_argument("--length_penalty", type=float, default=0.6,
                          help="beam search: alpha of ((5 + n) / 6)^alpha (0.6)")
    generate.add_argument("--eos_id", type=int, help="stop token (default: the vocabulary's EOS)")
    generate.add_argument("--seed", type=int, default=0, help="seed of the draws (0)")
    generate.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    generate.add_argument("--mesh", metavar="AXIS=SIZE,...",
                          help="decode on a device mesh, rows over data and heads over tensor, "
                               "e.g. data=2,tensor=4 (default: one device)")

    from paxlike.parallel import layouts

    layouts.add_arguments(commands.add_parser(
        "layouts", help="compare sharding layouts: memory, collectives and speed of one train step",
        description="Compile the train step under each --layout (without training) for local "
                    "devices or a TPU topology, e.g. paxlike layouts --gin_file "
                    "models/palm_62b.gin --topology v4:8x8x8 --layout fsdp --layout palm_2d"))

    from paxlike.hf.convert import add_convert_command

    add_convert_command(commands)

    from paxlike.data.commands import add_data_command, add_vocab_command

    add_data_command(commands)
    add_vocab_command(commands)
    for command in commands.choices.values():
        if not any("--verbose" in a.option_strings for a in command._actions):
            command.add_argument("--verbose", action="store_true",
                                 help="also show TensorFlow, absl, XLA and libtpu start-up logs")
    return parser


def _split_gin_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    rest, overrides = [], {}
    for arg in argv:
        if arg.startswith("--gin."):
            name, sep, value = arg[len("--gin."):].partition("=")
            if not sep or not name:
                _fail(f"malformed override {arg!r}; write --gin.NAME=VALUE")
            overrides[name] = value
        else:
            rest.append(arg)
    return rest, overrides


def _fail(message: str) -> None:
    print(f"paxlike: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _train(args: argparse.Namespace, overrides: dict[str, str]) -> None:
    from paxlike import gin_config
    from paxlike.parallel import distributed
    from paxlike.train.trainer import TrainConfig, train

    distributed.initialize()  # a no-op unless a launcher set PAXLIKE_* variables

    gin_config.parse(args.gin_file, overrides)
    config = gin_config.build(TrainConfig)
    # The output directory is an argument of train(); as in T5X, --gin.MODEL_DIR or a gin
    # file binding the macro also gives it.
    model_dir = args.model_dir or gin_config.macro("MODEL_DIR")
    if not isinstance(model_dir, str) or not model_dir:
        _fail("MODEL_DIR is not set; pass --model_dir DIR (or --gin.MODEL_DIR=DIR)")
    train(config, os.path.expanduser(model_dir), show_progress=False if args.no_progress else None)


def _human(count: int) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.2f}{suffix}"
    return str(count)


def _params(args: argparse.Namespace, overrides: dict[str, str]) -> None:
    import json

    from paxlike import gin_config
    from paxlike.model.config import ModelConfig
    from paxlike.model.param_count import count_params

    gin_config.parse(args.gin_file, overrides)
    counts = count_params(gin_config.build(ModelConfig))
    if args.json:
        print(json.dumps(counts))
        return
    # Mixture-of-experts models also say how many parameters one token uses.
    keys = ("total", "active") if counts["active"] != counts["total"] else ("total",)
    for key in (*keys, "embedding", "non_embedding"):
        print(f"{key:<16}{counts[key]:>20,}  ({_human(counts[key])})")
    print("by module:")
    for name, count in counts["by_module"].items():
        print(f"  {name:<28}{count:>20,}  {100 * count / counts['total']:6.2f}%")
    if counts["vocab_padding"]:
        print(f"not counted: {counts['vocab_padding']:,} parameters in the rows that pad the "
              "vocabulary (ModelConfig.vocab_pad_multiple)")


def _mfu(args: argparse.Namespace, overrides: dict[str, str]) -> None:
    import json

    from paxlike import gin_config
    from paxlike.errors import UserError
    from paxlike.model import flops
    from paxlike.model.config import ModelConfig
    from paxlike.model.param_count import abstract_params

    if args.tokens_per_sec <= 0 or args.chips <= 0 or (args.seq_len is not None and args.seq_len <= 0):
        raise UserError("--tokens_per_sec, --chips and --seq_len must be positive")
    gin_config.parse(args.gin_file, overrides)
    # HFU depends on the kernels 'auto' picks on the platform the throughput came from.
    cfg = gin_config.build(ModelConfig).for_platform(
        "tpu" if args.hardware.startswith("tpu") else "gpu")
    shapes = abstract_params(cfg)
    seq_len = args.seq_len or cfg.max_seq_len
    peak = flops.PEAK_FLOPS_BY_HARDWARE[args.hardware]
    per_token = flops.model_flops_per_token(cfg, shapes, seq_len)
    per_token_no_attn = flops.model_flops_per_token(cfg, shapes, seq_len, include_attention=False)
    hardware = flops.hardware_flops_per_token(cfg, shapes, seq_len)
    result = {
        "flops_per_token": per_token,
        "flops_per_token_no_attn": per_token_no_attn,
        "hardware_flops_per_token": hardware,
        "peak_flops_per_chip": peak,
        "mfu": flops.mfu(per_token, args.tokens_per_sec, args.chips, peak),
        "mfu_no_attn": flops.mfu(per_token_no_attn, args.tokens_per_sec, args.chips, peak),
        "hfu": flops.mfu(hardware, args.tokens_per_sec, args.chips, peak),
        "seq_len": seq_len,
        "remat_policy": cfg.remat_policy,
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"model FLOPs/token      {per_token:.4e}  (6N + 12*L*H*Q*T, T = {seq_len})")
    print(f"  without attention    {per_token_no_attn:.4e}  (6N)")
    print(f"hardware FLOPs/token   {hardware:.4e}  (remat policy {cfg.remat_policy!r})")
    print(f"peak per chip          {peak:.4e}  ({args.hardware}, dense bf16)")
    print(f"MFU                    {100 * result['mfu']:.1f}%  "
          f"({100 * result['mfu_no_attn']:.1f}% without attention)")
    print(f"HFU                    {100 * result['hfu']:.1f}%")


def _eval(args: argparse.Namespace, overrides: dict[str, str]) -> None:
    import json

    from paxlike.errors import UserError
    from paxlike.inference import evaluate, multiple_choice
    from paxlike.inference.load import load_model

    if overrides:
        raise UserError("eval takes no --gin.NAME=VALUE overrides")
    # The data is checked before the (possibly large) model is read.
    if args.task:
        evaluate.find_task(args.task, args.split, args.tasks_module)
    else:
        multiple_choice.read_items(args.multiple_choice)
    model = load_model(os.path.expanduser(args.model_dir), mesh=args.mesh)
    with model.context():  # the mesh and its rules, when --mesh gives one
        if args.task:
            result = evaluate.evaluate_perplexity(
                model, args.task, args.split, batch_size=args.batch_size, seq_len=args.seq_len,
                max_batches=args.max_batches, tasks_module=args.tasks_module)
        else:
            result = multiple_choice.evaluate_multiple_choice(
                model, args.multiple_choice, shots=args.shots, seed=args.seed,
                batch_size=args.batch_size, seq_len=args.seq_len)
    print(json.dumps(result.to_json()) if args.json else result.summary())


def _generate(args: argparse.Namespace, overrides: dict[str, str]) -> None:
    import json

    from paxlike.errors import UserError
    from paxlike.inference import generation
    from paxlike.inference.load import load_model

    if overrides:
        raise UserError("generate takes no --gin.NAME=VALUE overrides")
    # The prompts are read before the (possibly large) model is.
    prompts = generation.cli_prompts(args.prompt, args.prompt_file, args.prompt_ids)
    model = load_model(os.path.expanduser(args.model_dir), mesh=args.mesh)
    result = model.generate(
        prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, num_samples=args.num_samples, seed=args.seed,
        num_beams=args.num_beams, length_penalty=args.length_penalty, eos_id=args.eos_id)
    if args.json:
        for record in result.to_json():
            print(json.dumps(record))
    else:
        print(result.summary())


def _layouts(args: argparse.Namespace, overrides: dict[str, str]) -> None:
    from paxlike.parallel import layouts

    layouts.run(args, overrides)


def _convert(args: argparse.Namespace, overrides: dict[str, str]) -> None:
    from paxlike.errors import UserError
    from paxlike.hf.convert import run_convert

    if overrides:
        raise UserError("convert takes no --gin.NAME=VALUE overrides")
    run_convert(args)


def _data(args: argparse.Namespace, overrides: dict[str, str]) -> None:
    from paxlike.data.commands import run_data
    from paxlike.errors import UserError

    if overrides:
        raise UserError("data takes no --gin.NAME=VALUE overrides")
    run_data(args)


def _vocab(args: argparse.Namespace, overrides: dict[str, str]) -> None:
    from paxlike.data.commands import run_vocab
    from paxlike.errors import UserError

    if overrides:
        raise UserError("vocab takes no --gin.NAME=VALUE overrides")
    run_vocab(args)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `paxlike` console script (argv None: a process of its own)."""
    if argv is None and "--verbose" not in sys.argv[1:]:
        from paxlike.console import quiet_native_logs

        quiet_native_logs()  # before TensorFlow or a JAX backend starts
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, overrides = _split_gin_overrides(argv)
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        raise SystemExit(2)
    # force: TensorFlow/absl imports may already have given the root logger a handler.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
    logging.getLogger("paxlike").setLevel(logging.INFO)
    # jax warns that it probed for a TPU; on a CPU or GPU machine that is expected.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)
    from paxlike.errors import UserError
    from paxlike.train.faults import RunHalted

    try:
        {"train": _train, "params": _params, "mfu": _mfu, "eval": _eval, "generate": _generate,
         "layouts": _layouts, "convert": _convert, "data": _data,
         "vocab": _vocab}[args.command](args, overrides)
    except UserError as e:
        _fail(str(e))
    except RunHalted as e:
        print(f"paxlike: stopped: {e}", file=sys.stderr)
        raise SystemExit(e.exit_status) from None


if __name__ == "__main__":
    main()
