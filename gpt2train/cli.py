"""Command line: `python -m gpt2train train|generate|serve|evaluate|plot|tokenizer|keys|demo` and main.py.

Every config key can be overridden on the command line as `--key value` after the known flags.
User mistakes (UserError) print one clear message and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .distributed import add_flags as add_distributed_flags
from .errors import UserError

EXIT_USER_ERROR = 2


# ----------------------------------------------------------------------------- helpers
def parse_overrides(rest: list[str]) -> dict:
    """['--lr', '1e-4', '--n_layer=4'] -> {'lr': '1e-4', 'n_layer': '4'} (validated by config)."""
    out, i = {}, 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise UserError(f"unexpected argument {arg!r}: config overrides look like --key value")
        name = arg[2:]
        if "=" in name:
            name, value = name.split("=", 1)
            i += 1
        elif _is_switch(name) and (i + 1 == len(rest) or rest[i + 1].startswith("--")):
            value = "true"  # a yes/no key given alone: --resume_fallback
            i += 1
        elif i + 1 < len(rest):
            value = rest[i + 1]
            i += 2
        else:
            raise UserError(f"{arg} needs a value")
        out[name] = value
    return out


def _is_switch(name: str) -> bool:
    from .config import FIELDS
    return name in FIELDS and isinstance(FIELDS[name].default, bool)


def load(args, overrides: dict):
    from .config import load_config
    return load_config(args.model, overrides)


def add_sampling_flags(p: argparse.ArgumentParser, *, prompts: bool = True) -> None:
    from .sampling import add_flags
    g = p.add_argument_group("sampling" if prompts else "sampling defaults (a request may set each)")
    if prompts:
        g.add_argument("--predict_text", help="prompt text to continue")
        g.add_argument("--predict_file", help="file whose whole content is the prompt")
        g.add_argument("--prompts", help="file with one prompt per line (batched)")
        g.add_argument("--samples", type=int, default=None, help="samples per prompt (default: predict_batch_size)")
    add_flags(g)  # one flag per sampling option (sampling.SamplingOptions)


def add_checkpoint_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None, metavar="best|last|STEP",
                   help="which checkpoint: last (default), best (lowest eval loss, kept by keep_best) or a step number")


def check_tpu(requested: str | None) -> None:
    """--tpu NAME: the seed's flag. On a Cloud TPU VM the program runs on the TPU's own host, so
    the name is not dialled: the flag joins the slice's workers (distributed.initialize) and here
    insists that JAX sees a TPU, naming the fix if not."""
    if not requested:
        return
    import jax
    from .distributed import tpu_runtime_installed
    try:
        platforms = {d.platform for d in jax.devices()}
    except RuntimeError as e:  # libtpu present but the chips would not open (busy, or a driver mismatch)
        raise UserError(f"--tpu {requested}: JAX could not open the TPU ({str(e).splitlines()[0]}); "
                        "stop any other process using it (sudo lsof -w /dev/accel* /dev/vfio/*) and rerun") from None
    if "tpu" in platforms:
        return
    found = ", ".join(sorted(platforms))
    if not tpu_runtime_installed():  # JAX without its TPU runtime silently falls back to CPU
        raise UserError(f"--tpu {requested} was given but JAX finds no TPU (devices: {found}) and JAX's TPU support "
                        f"is not installed: on a Cloud TPU VM run pip install -e \".[tpu]\" in the clone; elsewhere drop --tpu")
    raise UserError(f"--tpu {requested} was given but JAX finds no TPU (devices: {found}) although JAX's TPU support "
                    "is installed: run on the Cloud TPU VM itself (on every worker of a pod slice), or drop --tpu")


def join_hosts(args) -> None:
    from .distributed import initialize
    initialize(args.coordinator_address, args.num_processes, args.process_id, tpu=bool(getattr(args, "tpu", None)))


# ----------------------------------------------------------------------------- commands
def cmd_train(cfg, log=print) -> dict:
    from .tokenizer import load_tokenizer
    from .train import Trainer
    tok = load_tokenizer(cfg.encoder_path)
    result = Trainer(cfg, tok, log=log).run()
    summary = {"step": result.step, "loss": result.last_loss, "eval_loss": result.eval_loss,
               "skipped_records": result.skipped_records}
    log(f"done at step {result.step}" + (f"; eval loss {result.eval_loss:.4f}" if result.eval_loss else "")
        + (f"; skipped {result.skipped_records} damaged records" if result.skipped_records else ""))
    return summary


def _prompts_from_args(args) -> list[str] | None:
    given = [x for x in ("predict_text", "predict_file", "prompts") if getattr(args, x, None) is not None]
    if len(given) > 1:
        raise UserError("give only one of --predict_text, --predict_file and --prompts, not "
                        + " and ".join("--" + g for g in given))
    if args.predict_text is not None:
        return [args.predict_text]
    path = args.predict_file or args.prompts
    if path is None:
        return None
    import fsspec
    try:
        with fsspec.open(path, "r", encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise UserError(f"prompt file not found: {path}") from None
    if args.predict_file:
        return [text]
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"{path} holds no prompts: write one prompt per line")
    return prompts


def load_generator(cfg, args):
    """The trained model's Generator, its checkpoint step, and the sampling flags as options."""
    from .checkpoint import parse_which
    from .generate import Generator
    from .inference import load_for_inference
    from .sampling import SamplingOptions
    from .tokenizer import load_tokenizer
    tok = load_tokenizer(cfg.encoder_path)
    check_vocabulary(cfg, tok)
    params, step, cfg = load_for_inference(cfg, tokenizer=tok, which=parse_which(getattr(args, "checkpoint", None)))
    return Generator(cfg, params, tok), step, SamplingOptions.from_values(vars(args), cfg)


def check_vocabulary(cfg, tok) -> None:
    if tok.n_vocab != cfg.n_vocab:
        raise UserError(f"n_vocab is {cfg.n_vocab} in the config but the tokenizer in {tok.name} has "
                        f"{tok.n_vocab} tokens: set encoder_path to the encoder the model was trained with")


def check_predict_path(path: str) -> None:
    """Open the file samples are appended to before generating, so a read-only place is one
    error up front rather than after the first sample."""
    import fsspec
    from .paths import os_reason
    fs, p = fsspec.core.url_to_fs(path)
    parent = p.rsplit("/", 1)[0] if "/" in p else ""
    try:
        if parent:
            fs.makedirs(parent, exist_ok=True)
        with fs.open(p, "a"):
            pass
    except OSError as e:
        raise UserError(f"cannot write samples to predict_path {path} ({os_reason(e)}): set --predict_path "
                        "to a file you can write") from None


def cmd_generate(cfg, args, *, interactive_ok: bool = True) -> list[str]:
    if args.samples is not None and args.samples < 1:
        raise UserError(f"--samples must be at least 1, got {args.samples}")
    check_predict_path(cfg.resolved_predict_path)
    gen, _, opts = load_generator(cfg, args)
    samples = args.samples or cfg.predict_batch_size
    prompts = _prompts_from_args(args)
    if prompts is None:
        if not interactive_ok:
            raise UserError("no prompt given: use --predict_text, --predict_file or --prompts")
        return interactive(gen, opts, samples, cfg)
    return sample_prompts(gen, prompts, opts, samples, cfg)


def sample_prompts(gen, prompts, opts, samples, cfg, *, stream=None) -> list[str]:
    """Generate `samples` continuations of each prompt in batches of predict_batch_size rows;
    print each sample in the seed's banner format and append it to predict_path."""
    from .generate import append_samples, format_sample, generate_batches
    out = []
    for batch in generate_batches(gen, prompts, opts, cfg.predict_batch_size, samples=samples, on_text=stream):
        for message in batch.warnings:
            print(f"warning: {message}", file=sys.stderr)
        for index, text in enumerate(batch.texts, batch.first):
            if stream is None:
                print(format_sample(index, text), end="", flush=True)
            append_samples(cfg.resolved_predict_path, [text], index)
            out.append(text)
    return out


def interactive(gen, opts, samples, cfg) -> list[str]:
    """Read prompts from the terminal (or one per line from piped stdin) until EOF."""
    tty = sys.stdin.isatty()
    out = []
    while True:
        try:
            prompt = input("Model prompt >>> ") if tty else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if not tty and prompt == "":
            break
        prompt = prompt.rstrip("\n")
        if not prompt.strip():
            if tty:
                print("Prompt should not be empty!")
            continue
        if tty and samples == 1:
            # Stream the text as it is produced.
            from .generate import banner
            print(banner(0), flush=True)
            texts = sample_prompts(gen, [prompt], opts, 1, cfg,
                                   stream=lambda _i, t: print(t, end="", flush=True))
            print("\n" + "=" * 80, flush=True)
        else:
            texts = sample_prompts(gen, [prompt], opts, samples, cfg)
        out.extend(texts)
    return out


def cmd_serve(cfg, args) -> None:
    from .checkpoint import parse_which
    from .inference import load_for_inference
    from .sampling import SamplingOptions
    from .serving.server import ServeSettings, ServingServer, bind, print_ready
    from .tokenizer import load_tokenizer
    sock = bind(args.host, args.port)  # before the model loads: a taken port fails at once
    settings = ServeSettings(slots=args.slots, max_tokens=args.max_tokens, max_queue=args.max_queue,
                             request_timeout=args.request_timeout, idle_timeout=args.idle_timeout)
    for name in ("slots", "max_tokens", "max_queue"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    tok = load_tokenizer(cfg.encoder_path)
    check_vocabulary(cfg, tok)
    params, step, cfg = load_for_inference(cfg, tokenizer=tok, which=parse_which(args.checkpoint))
    server = ServingServer(cfg, params, tok, SamplingOptions.from_values(vars(args), cfg), settings=settings,
                           step=step, sock=sock)
    print_ready(server, step, cfg.model_path)
    server.run()


def cmd_evaluate(cfg, data, stride=None, checkpoint: str | None = None) -> dict:
    from .checkpoint import parse_which
    from .evaluate import evaluate_text
    from .inference import load_for_inference
    from .tokenizer import load_tokenizer
    spec = data or cfg.eval_data_path
    if not spec:
        raise UserError("nothing to evaluate: pass --data FILES or set eval_data_path in the config")
    tok = load_tokenizer(cfg.encoder_path)
    check_vocabulary(cfg, tok)
    params, step, cfg = load_for_inference(cfg, tokenizer=tok, which=parse_which(checkpoint))
    result = {"step": step, "precision": cfg.precision, **evaluate_text(cfg, params, tok, spec, stride=stride)}
    print(f"step {step}: loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}  "
          f"bits/byte {result['bits_per_byte']:.4f}  ({result['tokens']} tokens, {result['bytes']} bytes; "
          f"{cfg.precision})")
    return result


def cmd_evaluate_tasks(cfg, args) -> dict:
    """evaluate --task NAME ... / --per_document: the yardsticks' table, and eval_tasks.json beside the run."""
    from .checkpoint import load_params, parse_which
    from .mesh import param_shardings
    from .tasks.run import TaskRunner, table, write_results
    from .tokenizer import load_tokenizer
    documents = None
    if args.per_document:
        documents = args.data or cfg.eval_data_path
        if not documents:
            raise UserError("--per_document scores your own text: pass --data FILES or set eval_data_path")
    tok = load_tokenizer(cfg.encoder_path)
    runner = TaskRunner(cfg, tok, args.task or [], task_data=args.task_data or cfg.task_data or None,
                        limit=args.limit, stride=args.stride, documents=documents)
    check_vocabulary(cfg, tok)
    params, step = load_params(cfg, sharding=param_shardings(cfg), tokenizer=tok,
                              which=parse_which(args.checkpoint))
    results = runner.run(params)
    print(f"step {step} of {cfg.model_path}\n" + table(results))
    record = {"step": step, "tasks": results}
    if cfg.model_path:
        print(f"wrote {write_results(cfg.model_path, record)}")
    return record


def cmd_export(cfg, args) -> None:
    """The HF-format export with its model card, written to --out and/or pushed to the Hub."""
    import tempfile
    from .checkpoint import load_params, parse_which
    from .model import count_params
    from .model_card import write_model_card
    from .pretrained import export_hf
    from .tokenizer import encoder_dir
    if not args.out and not args.push_to_hub:
        raise UserError("export needs --out DIR (a local copy), --push_to_hub ORG/NAME, or both")
    if args.push_to_hub:
        from .hub import is_repo_id
        if not is_repo_id(args.push_to_hub):
            raise UserError(f"--push_to_hub {args.push_to_hub!r} is not a repository id: write ORG/NAME (or NAME)")
    params, step = load_params(cfg, which=parse_which(args.checkpoint))
    with tempfile.TemporaryDirectory(prefix="gpt2train-export-") as scratch:
        out = args.out or scratch
        export_hf(params, cfg, out, encoder_dir(cfg.encoder_path))
        padding = (cfg.padded_vocab - cfg.n_vocab) * cfg.n_embd  # embedding rows that are not tokens
        write_model_card(out, cfg, step, args.push_to_hub, count_params(params) - padding)
        if args.out:
            print(f"exported step {step} of {cfg.model_path} to {args.out} (Hugging Face GPT-2 format)")
        if args.push_to_hub:
            from .hub import push_folder
            url = push_folder(out, args.push_to_hub, f"gpt2train: step {step} of {cfg.model_path}",
                              private=True if args.private else None)
            print(f"pushed step {step} of {cfg.model_path} to {url}")


def cmd_plot(args) -> None:
    try:
        from .plot import plot_runs
    except ImportError:
        raise UserError('plot needs matplotlib: pip install -e ".[plot]"') from None
    plot_runs(args.runs, args.out)
    print(f"wrote {args.out} ({len(args.runs)} run{'s' if len(args.runs) > 1 else ''})")


def cmd_tokenizer(args) -> None:
    from .paths import expand_paths
    from .tokenizer import train_tokenizer
    files = expand_paths(args.input)
    tok = train_tokenizer(files, args.vocab_size, args.out, text_field=args.text_field)
    print(f"trained a {tok.n_vocab}-token BPE vocabulary on {len(files)} files; "
          f"wrote {args.out}/encoder.json and {args.out}/vocab.bpe")


def cmd_encode(args) -> None:
    from .encode import encode_corpus
    encode_corpus(args.input, args.out, args.name, args.encoder_path, fmt=args.format, text_field=args.text_field,
                  files_per=args.files_per,
                  minimum_size=args.minimum_size, workers=args.workers,
                  holdout_fraction=args.holdout_fraction, holdout_inputs=args.holdout_input)


# ----------------------------------------------------------------------------- parsers
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpt2train", allow_abbrev=False, description=__doc__.splitlines()[0],
                                epilog="Any config key may follow as --key value to override the config.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (or resume) from a JSON config", allow_abbrev=False)
    t.add_argument("--model", required=True, help="JSON config")
    t.add_argument("--tpu", help="TPU name (fails clearly when no TPU is present)")
    add_distributed_flags(t)

    g = sub.add_parser("generate", allow_abbrev=False, help="sample from a trained model")
    g.add_argument("--model", required=True, help="JSON config of the trained model")
    add_checkpoint_flag(g)
    add_sampling_flags(g)

    s = sub.add_parser("serve", allow_abbrev=False,
                       help="an OpenAI-compatible HTTP API with continuous batching, metrics and a playground page")
    s.add_argument("--model", required=True, help="JSON config of the trained model")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 = every interface)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = a free one, printed at start)")
    add_checkpoint_flag(s)
    s.add_argument("--slots", type=int, default=None, help="texts decoded together (default: from memory, at most 16)")
    s.add_argument("--max_tokens", type=int, default=None, help="the most tokens a request may ask for (default: n_ctx)")
    s.add_argument("--max_queue", type=int, default=256, help="texts that may wait for a slot; more get 429 (default 256)")
    s.add_argument("--request_timeout", type=float, default=600.0, help="seconds a request may take (default 600)")
    s.add_argument("--idle_timeout", type=float, default=5.0,
                   help="seconds a connection may stay silent before or between requests (default 5)")
    add_sampling_flags(s, prompts=False)

    e = sub.add_parser("evaluate", allow_abbrev=False, help="loss, perplexity and bits per byte on text")
    e.add_argument("--model", required=True, help="JSON config of the trained model")
    e.add_argument("--data", help="files, directory or glob (default: eval_data_path)")
    e.add_argument("--json", action="store_true", help="print the result as JSON too")
    e.add_argument("--stride", type=int, default=None,
                   help="sliding windows of n_ctx tokens moved by STRIDE; only new tokens are scored")
    e.add_argument("--task", nargs="+", metavar="NAME",
                   help="score standard tasks instead: lambada hellaswag wikitext2 wikitext103 enwik8 (several at once)")
    e.add_argument("--task_data", help="a directory with local copies of the tasks' files (default: download and cache)")
    e.add_argument("--per_document", action="store_true",
                   help="perplexity of each document of --data on its own, as lm-evaluation-harness scores it")
    e.add_argument("--limit", type=int, default=0, help="score only the first N items of each task (default: all)")
    add_checkpoint_flag(e)

    o = sub.add_parser("plot", allow_abbrev=False, help="draw runs' training curves into one PNG or SVG figure")
    o.add_argument("runs", nargs="+", metavar="RUN", help="a run's model_path (holding metrics.jsonl), the file, or its config")
    o.add_argument("--out", default="curves.png", help="the figure: .png or .svg (default curves.png)")

    k = sub.add_parser("tokenizer", allow_abbrev=False, help="train a byte-level BPE vocabulary on text files")
    k.add_argument("--input", required=True, nargs="+", help="text, JSONL or Parquet files, directories or globs")
    k.add_argument("--text_field", default="text", help="the text column of Parquet inputs / field of JSONL lines (default text)")
    k.add_argument("--vocab_size", type=int, required=True)
    k.add_argument("--out", required=True, help="directory for encoder.json + vocab.bpe")

    n = sub.add_parser("encode", allow_abbrev=False, help="text -> BPE tokens -> NAME_i.tfrecords (parallel, resumable)")
    n.add_argument("--input", required=True, nargs="+", help="text, JSONL (a \"text\" field per line) or Parquet (a \"text\" column) files, directories or globs, local or remote (gs://, s3://, hf://datasets/...)")
    n.add_argument("--out", required=True, help="output directory (local or gs://)")
    n.add_argument("--name", required=True, help="file-name prefix: NAME_0.tfrecords, NAME_1.tfrecords, ...")
    n.add_argument("--encoder_path", required=True, help="directory with encoder.json and vocab.bpe")
    n.add_argument("--files_per", type=int, default=100_000, help="documents per output file (default 100000)")
    n.add_argument("--minimum_size", type=int, default=128, help="drop documents under this many tokens (default 128)")
    n.add_argument("--workers", type=int, default=None, help="worker processes (default: one per core; 0 = in-process)")
    n.add_argument("--format", choices=("tfrecords", "bin"), default="tfrecords",
                   help="tfrecords (default) or bin: llm.c token shards NAME_i.bin, read by the bin input, nanoGPT and llm.c")
    n.add_argument("--text_field", default="text", help="the text column of Parquet inputs / field of JSONL lines (default text)")
    held = n.add_mutually_exclusive_group()
    held.add_argument("--holdout_fraction", type=float, default=0.0, help="share of documents written to OUT/eval/ instead")
    held.add_argument("--holdout_input", nargs="+", help="inputs written to OUT/eval/ as the held-out set")

    w = sub.add_parser("download", allow_abbrev=False, help="fetch a pretrained GPT-2 or convert a checkpoint directory")
    w.add_argument("source", help="124M 355M 774M 1558M (117M, 345M), encoder, or a directory (HF or OpenAI format)")
    w.add_argument("--out", default="models", help="where models go (default: models)")

    x = sub.add_parser("export", allow_abbrev=False, help="write a trained model in Hugging Face format")
    x.add_argument("--model", required=True, help="JSON config of the trained model")
    x.add_argument("--out", help="directory for config.json, model.safetensors, tokenizer files, README.md")
    x.add_argument("--push_to_hub", metavar="ORG/NAME", help="upload the export and its model card to this Hub repository")
    x.add_argument("--private", action="store_true", help="with --push_to_hub: create the repository private")
    add_checkpoint_flag(x)

    m = sub.add_parser("memory", allow_abbrev=False, help="memory per device and step time of a config on a mesh")
    m.add_argument("--model", help="JSON config (its mesh_data, mesh_fsdp, batch, n_ctx, remat, opt_name, precision)")
    m.add_argument("--devices", type=int, default=None, help="number of devices (default: this machine's)")
    m.add_argument("--sheet", help="write the scale sheet for 124M..1558M to this Markdown file instead")

    y = sub.add_parser("keys", help="list every config key with its default and meaning")
    y.add_argument("--markdown", action="store_true",
                   help="print docs/options.md instead: config keys, optimizers and sampling options")

    d = sub.add_parser("demo", allow_abbrev=False, help="the built-in demo: train on Python's standard library, then sample")
    d.add_argument("--out", default="demo_run", help="working directory (default: demo_run)")
    d.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's)")
    return p


def run_main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "keys":
        from .config import describe_keys
        from .option_docs import keys_markdown
        print(keys_markdown() if args.markdown else describe_keys(), end="\n" if not args.markdown else "")
        return 0
    if args.command == "memory" and (args.sheet or not args.model):
        if not args.sheet:
            raise UserError("give --model CONFIG (one config) or --sheet FILE (the scale sheet)")
        from .memory import sheet_markdown
        import fsspec
        with fsspec.open(args.sheet, "w") as f:
            f.write(sheet_markdown())
        print(f"wrote {args.sheet}")
        return 0
    if args.command == "download":
        if rest:
            raise UserError(f"unexpected arguments: {' '.join(rest)}")
        from .download import download
        download(args.source, args.out)
        return 0
    if args.command == "plot":
        if rest:
            raise UserError(f"unexpected arguments: {' '.join(rest)}")
        cmd_plot(args)
        return 0
    if args.command in ("tokenizer", "encode"):
        if rest:
            raise UserError(f"unexpected arguments: {' '.join(rest)}")
        (cmd_tokenizer if args.command == "tokenizer" else cmd_encode)(args)
        return 0
    from . import compile_cache  # every command below compiles
    compile_cache.enable()
    if args.command == "demo":
        from .demo import run_demo
        run_demo(args.out, steps=args.steps, extra=parse_overrides(rest))
        return 0
    overrides = parse_overrides(rest)
    cfg = load(args, overrides)
    if args.command == "train":
        join_hosts(args)
        check_tpu(args.tpu)
        cmd_train(cfg)
    elif args.command == "generate":
        cmd_generate(cfg, args)
    elif args.command == "serve":
        cmd_serve(cfg, args)
    elif args.command == "memory":
        import jax
        from .memory import report
        print(report(cfg, args.devices or jax.device_count()))
    elif args.command == "export":
        cmd_export(cfg, args)
    elif args.command == "evaluate":
        if args.task or args.per_document:
            result = cmd_evaluate_tasks(cfg, args)
        else:
            result = cmd_evaluate(cfg, args.data, args.stride, args.checkpoint)
        if args.json:
            print(json.dumps(result))
    return 0


def guarded(fn, argv=None) -> int:
    """Run a command; turn user mistakes into one-line errors and a non-zero exit."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        return fn(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        if getattr(e, "exit_at_once", False):  # checkpoint.SaveFailed: skip the shutdown's noise
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_USER_ERROR)
        return EXIT_USER_ERROR
    except OSError as e:  # the machine's fault (disk full, read-only, permission), not a bug: one line too
        from .paths import os_reason
        print(f"error: {os_reason(e)}: free space or fix the path's permissions, then rerun", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> None:
    if argv is None and os.path.basename(sys.argv[0]).startswith("gpt2train"):  # the `gpt2train` script,
        from .host_memory import reexec_with_resident_heap                      # not a notebook or a test
        reexec_with_resident_heap()
    sys.exit(guarded(run_main, argv))


# ----------------------------------------------------------------------------- main.py
def seed_main(argv: list[str] | None = None) -> int:
    """The seed's interface: train unless a predict flag is given, then generate."""
    p = argparse.ArgumentParser(prog="main.py", allow_abbrev=False, description="Train GPT-2 from a JSON config, or sample from it.",
                                epilog="Any config key may follow as --key value to override the config.")
    p.add_argument("--model", required=True, help="JSON config (see configs/)")
    p.add_argument("--tpu", help="TPU name (fails clearly when no TPU is present)")
    add_sampling_flags(p)
    add_distributed_flags(p)
    args, rest = p.parse_known_args(argv)
    from . import compile_cache
    compile_cache.enable()
    join_hosts(args)
    training = args.predict_text is None and args.predict_file is None and args.prompts is None
    if training and args.seed is not None:  # when training, --seed is the config's seed
        rest += ["--seed", str(args.seed)]
    cfg = load(args, parse_overrides(rest))
    check_tpu(args.tpu)
    if training:
        cmd_train(cfg)
    else:
        cmd_generate(cfg, args, interactive_ok=False)
    return 0
