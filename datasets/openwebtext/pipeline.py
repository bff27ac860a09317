"""Build an OpenWebText-style corpus: URL list -> pages -> main text -> dedup -> .tfrecords.

    python datasets/openwebtext/pipeline.py all --urls urls.txt --work owt_work \\
        --encoder_path models/encoder

Stages (each resumable; rerunning skips finished work): `download` (work/html/, manifest
work/download.jsonl), `extract` (work/text/, manifest work/extract.jsonl), `encode`
(work/records/openwebtext_i.tfrecords, through `python -m gpt2train encode`), or `all`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the owt package beside this script

from owt.download import DownloadSettings, download  # noqa: E402
from owt.extract import extract  # noqa: E402
from owt.urls import read_urls  # noqa: E402


def run_download(args) -> dict:
    if not args.urls:
        raise SystemExit("error: the download stage needs --urls FILE (one URL per line)")
    if not Path(args.urls).is_file():
        raise SystemExit(f"error: URL list {args.urls} not found")
    urls, duplicates, invalid = read_urls(Path(args.urls))
    settings = DownloadSettings(concurrency=args.concurrency, per_host_delay=args.per_host_delay,
                                timeout=args.timeout, retries=args.retries, backoff=args.backoff,
                                max_bytes=args.max_bytes)
    counts = download(urls, Path(args.work), settings, progress=not args.quiet)
    return {"urls": len(urls), "duplicate_urls": duplicates, "invalid_urls": invalid, **counts}


def run_extract(args) -> dict:
    return extract(Path(args.work), min_chars=args.min_chars, progress=not args.quiet)


def run_encode(args) -> dict:
    from gpt2train.encode import encode_corpus, summary_dict
    from gpt2train.errors import UserError

    text = Path(args.work) / "text"
    if not text.is_dir():
        raise SystemExit(f"error: {text} does not exist: run the extract stage first")
    try:
        summary = encode_corpus(str(text), str(Path(args.work) / "records"), args.name, args.encoder_path,
                                files_per=args.files_per, minimum_size=args.minimum_size, workers=args.workers,
                                holdout_fraction=args.holdout_fraction, progress=not args.quiet,
                                log=lambda line: print(line, file=sys.stderr))
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    return {k: v for k, v in summary_dict(summary).items() if k != "paths"}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=["download", "extract", "encode", "all"])
    p.add_argument("--work", required=True, help="working directory for every stage's output")
    p.add_argument("--urls", help="URL list, one per line (# comments allowed)")
    p.add_argument("--concurrency", type=int, default=8, help="requests at once overall")
    p.add_argument("--per_host_delay", type=float, default=1.0, help="seconds between requests to one host")
    p.add_argument("--timeout", type=float, default=20.0, help="seconds per request")
    p.add_argument("--retries", type=int, default=3, help="retries of 5xx/429/network failures")
    p.add_argument("--backoff", type=float, default=1.0, help="seconds before the first retry (doubles)")
    p.add_argument("--max_bytes", type=int, default=5_000_000, help="skip pages larger than this")
    p.add_argument("--min_chars", type=int, default=200, help="pages with less main text count as empty")
    p.add_argument("--encoder_path", help="directory with encoder.json + vocab.bpe (encode stage)")
    p.add_argument("--name", default="openwebtext", help="record file prefix")
    p.add_argument("--files_per", type=int, default=100_000)
    p.add_argument("--minimum_size", type=int, default=128)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--holdout_fraction", type=float, default=0.0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    stages = ["download", "extract", "encode"] if args.stage == "all" else [args.stage]
    if "encode" in stages and not args.encoder_path:
        raise SystemExit("error: the encode stage needs --encoder_path (get GPT-2's: python3 download_model.py encoder)")
    for stage in stages:
        result = {"download": run_download, "extract": run_extract, "encode": run_encode}[stage](args)
        print(json.dumps({"stage": stage, **result}), flush=True)


if __name__ == "__main__":
    main()
