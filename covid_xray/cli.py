"""``covid-xray``: predict from the command line, or serve the web app under waitress.

    covid-xray predict IMAGE... [--models-dir models]     one JSON line per image
    covid-xray serve [--host 127.0.0.1] [--port 8000] [--models-dir models] [--max-upload-mb 10]

``predict`` goes through the same :class:`~covid_xray.predict.PredictionService` as the API, so the
numbers are identical. Exit status: 0 all images answered, 1 the models cannot be loaded (the
message names the file), 2 some images could not be read (their lines carry ``error``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from covid_xray.errors import PipelineError
from covid_xray.imaging import MAX_PIXELS_DEFAULT

if TYPE_CHECKING:
    from covid_xray.predict import PredictionService


OOD_HELP = ("multiplies the feature-distance limit fitted at training (default 1); raise it to "
            "accept images further from the training set")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="covid-xray",
        description="COVID-19 chest X-ray classifiers (educational, not a diagnostic device).")
    sub = parser.add_subparsers(dest="command", required=True)

    predict = sub.add_parser("predict", help="classify image files, one JSON line per image")
    predict.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    predict.add_argument("--models-dir", type=Path, default=Path("models"),
                         help="folder holding <model>.keras + <model>.json for both models")
    predict.add_argument("--max-pixels", type=int, default=MAX_PIXELS_DEFAULT,
                         help="refuse images with more pixels than this (decompression bombs)")
    predict.add_argument("--ood-tolerance", type=float, default=1.0, help=OOD_HELP)

    serve = sub.add_parser("serve", help="serve the web page and JSON API (waitress)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="interface to listen on (0.0.0.0 for all; default loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--models-dir", type=Path, default=Path("models"))
    serve.add_argument("--max-upload-mb", type=float, default=10.0,
                       help="larger uploads get 413")
    serve.add_argument("--max-pixels", type=int, default=MAX_PIXELS_DEFAULT)
    serve.add_argument("--ood-tolerance", type=float, default=1.0, help=OOD_HELP)
    serve.add_argument("--threads", type=int, default=4, help="waitress worker threads")
    return parser


def _load_service(args: argparse.Namespace) -> PredictionService:
    """Imported lazily: TensorFlow takes seconds to import, ``--help`` should not."""
    from covid_xray.predict import PredictionService

    if args.ood_tolerance <= 0:
        raise PipelineError(f"--ood-tolerance must be positive, got {args.ood_tolerance}")
    return PredictionService.load(args.models_dir, max_pixels=args.max_pixels,
                                  ood_tolerance=args.ood_tolerance)


def cmd_predict(args: argparse.Namespace) -> int:
    """Print one JSON object per image (``file`` + the API's answer, or ``file`` + ``error``)."""
    from covid_xray.predict import InputError

    service = _load_service(args)
    failed = 0
    for path in args.images:
        try:
            answer = {"file": str(path), **service.predict_bytes(path.read_bytes())}
        except (OSError, InputError) as exc:
            failed += 1
            status = getattr(exc, "status", 400)
            answer = {"file": str(path), "error": f"{path}: {exc}", "status": status}
        print(json.dumps(answer), flush=True)
    return 2 if failed else 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Load the models (fail fast), then serve under waitress until interrupted."""
    import waitress

    from covid_xray.serving.app import create_app

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    service = _load_service(args)
    app = create_app({"SERVICE": service, "MODELS_DIR": str(args.models_dir),
                      "MAX_UPLOAD_MB": args.max_upload_mb, "MAX_PIXELS": args.max_pixels,
                      "OOD_TOLERANCE": args.ood_tolerance})
    names = ", ".join(f"{m.name} ({m.version()['sha256']})" for m in service.models)
    print(f"covid-xray: models {names}; serving http://{args.host}:{args.port}/", flush=True)
    body_limit = int(args.max_upload_mb * 1024 * 1024) * 2 + 65536  # app answers 413 first
    waitress.serve(app, host=args.host, port=args.port, threads=args.threads,
                   max_request_body_size=body_limit, ident="covid-xray")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``covid-xray`` command."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "predict":
            return cmd_predict(args)
        return cmd_serve(args)
    except PipelineError as exc:  # ModelLoadError and friends: one line naming the file
        print(f"covid-xray: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
