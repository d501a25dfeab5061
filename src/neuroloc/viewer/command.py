"""``neuroloc view``: serve a local web viewer for a localize JSONL file or an evaluate folder."""

from __future__ import annotations

import ipaddress
import socket
import sys
import threading
import time
import webbrowser
from pathlib import Path

import click

from neuroloc.options import MAX_THREADS, FiniteFloatRange, class_names_option, intensity_option, max_pixels_option
from neuroloc.viewer import INSTALL_HINT, missing_dependencies

VIEW_HELP = """Look at results in the browser: RESULTS is a JSON Lines file written by
`neuroloc localize` or a folder written by `neuroloc evaluate`.

\b
The viewer shows a gallery of the images with their boxes (and, for an evaluation,
the ground-truth boxes and IoU), sortable and filterable by class, score, localization
confidence (least confident first, to review boxes), IoU and errors; a page per image
with every chosen neuron's map and blob, the union mask or DAM vote map, recomputed
on demand for another class or other settings; an upload box for new images; and,
for an evaluation, the metrics table, the plots and the best and worst cases.

\b
It listens on 127.0.0.1 (this computer only) unless --host says otherwise, and
serves only the results' pictures and the evaluation folder's files.
Needs the optional extra:  pip install "neuroloc[view]"

\b
Examples:
  neuroloc view boxes.jsonl
  neuroloc view runs/dev --port 8000 --no-browser
"""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@click.command("view", help=VIEW_HELP, no_args_is_help=True)
@click.argument("results", type=click.Path(exists=True, path_type=Path))
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True, help="Port; 0 picks a free one.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but a loopback address lets other computers see the results "
              "and run the model.")
@click.option("--no-browser", is_flag=True, help="Do not open a browser window.")
@click.option("-m", "--model", "model_name",
              help="Classifier for recomputing (default: the one the results name, else efficientnet_lite0).")
@click.option("--weights", type=click.Path(exists=True, path_type=Path),
              help="Weights file for --model.")
@click.option("--threads", type=click.IntRange(1, MAX_THREADS), help="CPU threads for PyTorch (default: PyTorch's choice).")
@click.option("--max-upload-mb", type=FiniteFloatRange(min=0, min_open=True), default=20, show_default=True,
              help="Largest image that can be uploaded, in MB.")
@click.option("--directions", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Feature directions from `neuroloc calibrate` for the default's objectness map when the viewer "
              "localizes an image itself (it sees one image at a time, too few to fit them).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where thumbnails and uploads are kept (default: the user cache folder, neuroloc/viewer).")
@class_names_option("the class typed for a box")
@intensity_option()
@max_pixels_option()
def view_command(
    results: Path, port: int, host: str, no_browser: bool, model_name: str | None, weights: Path | None,
    threads: int | None, max_upload_mb: float, cache_dir: Path | None, directions: Path | None = None,
    class_names: Path | None = None, intensity: str = "range",
) -> None:
    missing = missing_dependencies()
    if missing:
        click.echo(f"neuroloc view needs {', '.join(missing)}, which is not installed. Install it with:\n"
                   f"  {INSTALL_HINT}", err=True)
        sys.exit(1)
    import uvicorn

    from neuroloc.viewer.app import LOOPBACK_HOSTS, create_app
    from neuroloc.viewer.index import IndexError_, load_results

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    began = time.perf_counter()
    try:
        index = load_results(results)
    except IndexError_ as exc:
        raise click.ClickException(str(exc)) from None
    count = sum(s.count for s in index.sources.values())
    click.echo(f"neuroloc view: {count:,} results from {results} indexed in {time.perf_counter() - began:.1f} s", err=True)
    if count == 0:
        click.echo(f"  warning: {results} holds no localization lines (the JSON Lines `neuroloc localize` writes); "
                   "only uploads can be viewed", err=True)
    loopback = _is_loopback(host)
    if not loopback:
        click.echo(f"  warning: listening on {host}: other computers can see these results and run the model", err=True)
    if model_name is not None:  # a name that names nothing would fail on every request, not here
        from neuroloc.imageio import first_line
        from neuroloc.models import ModelError, get_spec

        try:
            get_spec(model_name)
        except ModelError as exc:
            raise click.BadParameter(first_line(exc), param_hint="'--model'") from None
    fitted = None
    if directions is not None:
        from neuroloc.directions import DirectionsError, load_directions

        try:
            fitted = load_directions(directions)
        except DirectionsError as exc:
            raise click.ClickException(str(exc)) from None
    if class_names is not None:
        from neuroloc.classes import ClassLookupError, read_class_names

        try:
            read_class_names(class_names)  # checked now; their number is checked when the model loads
        except ClassLookupError as exc:
            raise click.ClickException(str(exc)) from None
    app = create_app(index, model=model_name, weights=weights, cache_dir=cache_dir, class_names=class_names,
                     max_upload_bytes=int(max_upload_mb * 1024 * 1024),
                     allowed_hosts=[*LOOPBACK_HOSTS, host.strip("[]")] if loopback else None, directions=fitted,
                     intensity=intensity)
    for warning in index.warnings:  # the index's, and the app's about the model
        click.echo(f"  warning: {warning}", err=True)
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    bound = sock.getsockname()[1]
    shown = f"[{host.strip('[]')}]" if family == socket.AF_INET6 else host
    url = f"http://{shown}:{bound}/"
    click.echo(f"neuroloc view: serving on {url}  (Ctrl-C stops it)", err=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    if not no_browser:
        threading.Thread(target=_open_when_ready, args=(server, url), daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


def _open_when_ready(server: object, url: str) -> None:
    for _ in range(200):
        if getattr(server, "started", False):
            webbrowser.open(url)
            return
        time.sleep(0.05)
