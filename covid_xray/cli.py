"""``covid-xray``: predict from the command line, or serve the web app under waitress.

    covid-xray predict IMAGE... [--models-dir models]     one JSON line per image
    covid-xray serve [--host 127.0.0.1] [--port 8000] [--models-dir models] [--max-upload-mb 10]
                     (covid-xray serve --help: every option)

``predict`` goes through the same :class:`~covid_xray.predict.PredictionService` as the API, so the
numbers are identical. Exit status: 0 all images answered, 1 the models cannot be loaded (the
message names the file), 2 a bad option (one line naming it; for ``serve`` also a port that cannot
be listened on) or, for ``predict``, some images could not be read (their lines carry ``error``).
Option limits and defaults live in :mod:`covid_xray.serving.settings`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from covid_xray.errors import PipelineError
from covid_xray.imaging import MAX_DECODED_BYTES_DEFAULT, MAX_PIXELS_DEFAULT
from covid_xray.serving import settings
from covid_xray.serving.settings import SettingError

if TYPE_CHECKING:
    from covid_xray.predict import PredictionService


OOD_HELP = ("multiplies the feature-distance limit fitted at training (default 1); raise it to "
            "accept images further from the training set")
USAGE_ERROR = 2
DECODED_HELP = (f"refuse images whose decoded pixels would take more MiB than this (width x height "
                f"x channels x bytes per channel; {settings.MIN_MAX_DECODED_MB:g} to "
                f"{settings.MAX_MAX_DECODED_MB:g}, default %(default)g)")
SLOTS_HELP = (f"large decodes (over 16 MiB) that may run at once, the others wait (1 to "
              f"{settings.MAX_DECODE_SLOTS}, default %(default)s)")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def _checked(check: Callable[[Any], Any]) -> Callable[[str], Any]:
    """An argparse ``type=`` from a settings check; argparse prefixes "argument --name: "."""
    def parse(text: str) -> Any:
        try:
            return check(text)
        except SettingError as exc:  # "--port must be ..." -> "must be ..."
            raise argparse.ArgumentTypeError(str(exc).split(" ", 1)[1]) from None
    parse.__name__ = check.__name__
    return parse


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="covid-xray",
        description="COVID-19 chest X-ray classifiers (educational, not a diagnostic device).")
    sub = parser.add_subparsers(dest="command", required=True)

    predict = sub.add_parser("predict", help="classify image files, one JSON line per image")
    predict.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    predict.add_argument("--models-dir", type=Path, default=Path("models"),
                         help="folder holding <model>.keras + <model>.json for both models")
    pixels_help = (f"refuse images with more pixels than this (decompression bombs; "
                   f"{settings.MIN_MAX_PIXELS:,} to {settings.MAX_MAX_PIXELS:,})")
    predict.add_argument("--max-pixels", type=_checked(settings.max_pixels),
                         default=MAX_PIXELS_DEFAULT, help=pixels_help)
    predict.add_argument("--ood-tolerance", type=_checked(settings.ood_tolerance), default=1.0,
                         help=OOD_HELP)
    _decode_options(predict)

    serve = sub.add_parser("serve", help="serve the web page and JSON API (waitress)")
    serve.add_argument("--host", type=_checked(settings.host), default=settings.DEFAULT_HOST,
                       help="interface to listen on (0.0.0.0 for all; default loopback only)")
    serve.add_argument("--port", type=_checked(settings.port), default=settings.DEFAULT_PORT,
                       help="TCP port, 1-65535 (default %(default)s)")
    serve.add_argument("--models-dir", type=Path, default=Path("models"))
    serve.add_argument("--max-upload-mb", type=_checked(settings.max_upload_mb),
                       default=settings.DEFAULT_MAX_UPLOAD_MB,
                       help="larger uploads get a JSON 413 (default %(default)g, at most "
                            f"{settings.MAX_UPLOAD_MB_LIMIT:g})")
    serve.add_argument("--max-pixels", type=_checked(settings.max_pixels),
                       default=MAX_PIXELS_DEFAULT, help=pixels_help)
    serve.add_argument("--ood-tolerance", type=_checked(settings.ood_tolerance), default=1.0,
                       help=OOD_HELP)
    _decode_options(serve)
    serve.add_argument("--threads", type=_checked(settings.threads),
                       default=settings.DEFAULT_THREADS,
                       help=f"waitress worker threads, 1-{settings.MAX_THREADS} "
                            "(default %(default)s)")
    serve.add_argument("--connection-limit", type=_checked(settings.connection_limit),
                       default=settings.DEFAULT_CONNECTION_LIMIT,
                       help="open connections beyond which new ones wait "
                            f"({settings.MIN_CONNECTION_LIMIT}-{settings.MAX_CONNECTION_LIMIT:,}; "
                            "default %(default)s)")
    serve.add_argument("--channel-timeout", type=_checked(settings.channel_timeout),
                       default=settings.DEFAULT_CHANNEL_TIMEOUT_S,
                       help="seconds after which a connection that sends nothing is closed "
                            f"(1-{settings.MAX_CHANNEL_TIMEOUT_S}; default %(default)s)")
    return parser


def _decode_options(command: argparse.ArgumentParser) -> None:
    """The decoder's memory limits, shared by ``predict`` and ``serve``."""
    command.add_argument("--max-decoded-mb", type=_checked(settings.max_decoded_mb),
                         default=MAX_DECODED_BYTES_DEFAULT / settings.MIB, help=DECODED_HELP)
    command.add_argument("--decode-slots", type=_checked(settings.decode_slots),
                         default=settings.DEFAULT_DECODE_SLOTS, help=SLOTS_HELP)


def _load_service(args: argparse.Namespace) -> PredictionService:
    """Imported lazily: TensorFlow takes seconds to import, ``--help`` should not."""
    from covid_xray.predict import PredictionService

    return PredictionService.load(args.models_dir, max_pixels=args.max_pixels,
                                  ood_tolerance=args.ood_tolerance,
                                  max_bytes=settings.decoded_bytes_cap(args.max_decoded_mb),
                                  decode_slots=args.decode_slots)


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
    """Check the address (fail fast), load the models, then serve until interrupted."""
    settings.check_listen(args.host, args.port)  # before TensorFlow's import: in a second
    settings.ensure_open_files(args.connection_limit)

    import waitress

    from covid_xray.serving.app import create_app

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    service = _load_service(args)
    app = create_app({"SERVICE": service, "MODELS_DIR": str(args.models_dir),
                      "MAX_UPLOAD_MB": args.max_upload_mb, "MAX_PIXELS": args.max_pixels,
                      "OOD_TOLERANCE": args.ood_tolerance,
                      "MAX_DECODED_MB": args.max_decoded_mb, "DECODE_SLOTS": args.decode_slots})
    options = settings.waitress_settings(args.host, args.port, args.max_upload_mb, args.threads,
                                         args.connection_limit, args.channel_timeout)
    try:
        server = waitress.create_server(app, **options)
    except OSError as exc:  # taken between the check and now
        raise SettingError(f"cannot listen on {args.host}:{args.port}: "
                           f"{exc.strerror or exc}") from None
    names = ", ".join(f"{m.name} ({m.version()['sha256']})" for m in service.models)
    from covid_xray.modeling import tf_devices  # loaded with the models: TensorFlow is imported

    print(f"covid-xray: models {names} on {', '.join(tf_devices())}; "
          f"serving http://{args.host}:{args.port}/ "
          f"(connection limit {args.connection_limit}, idle timeout {args.channel_timeout} s)",
          flush=True)
    server.run()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``covid-xray`` command."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "predict":
            return cmd_predict(args)
        return cmd_serve(args)
    except SettingError as exc:  # found only when used: a busy port, too few open files
        print(f"covid-xray {args.command}: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except PipelineError as exc:  # ModelLoadError and friends: one line naming the file
        print(f"covid-xray: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
