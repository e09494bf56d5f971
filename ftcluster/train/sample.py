"""Try what a run trained: ``python -m ftcluster.train.sample OUTPUT_URI --prompt TEXT``.

``ftcluster sample RUN_OR_URI`` runs this module in a subprocess (the core package never imports
torch). It picks the run's newest usable artifact under the output URI (``merged``/``final``: a
whole model; else ``adapter``, else the newest ``adapters/step-N``), reads the spec the run
trained with from the artifact's ``ftcluster_meta.json``, loads the base model as training did
(a ``random_init`` base is rebuilt from the spec's seed, like every rank builds it), applies the
adapter, formats the prompt the way the run's ``data.format`` trained it (instruction: the
Alpaca prompt; chat: the tokenizer's chat template with one user turn; text: as it is) and prints
only the completion on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import FtclusterError, TrainError
from ..storage.layout import ADAPTERS, META
from .generation import format_prompt, generate


def find_artifact(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[str, bool]:
    """``(folder URI, is a whole model)`` of the newest committed artifact under ``uri``
    (:meth:`ftcluster.storage.catalog.Catalog.newest_model`)."""
    from ..storage.catalog import Catalog

    item = Catalog(uri, storage_options).newest_model()
    if item is not None:
        return item.uri, item.whole_model
    raise TrainError(f"{uri}: no trained model or adapter there yet (looked for merged/, final/, adapter/ and "
                     f"{ADAPTERS}/step-N/ with a manifest); wait for the run's first checkpoint or check the URI")


def load(folder: Path, device: Any) -> tuple[Any, Any, Any]:
    """``(model, tokenizer, spec)`` of a downloaded whole model (``merged/``, ``final/``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..spec.loader import spec_from_dict
    from .model import compute_dtype
    from .tokenizer import CHAT_TEMPLATE

    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TrainError(f"{folder}/{META}: cannot read the run's metadata ({exc}); is this an ftcluster output?") from None
    spec = spec_from_dict(meta["training"])
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)  # saved by the run, as trained
    if tokenizer.pad_token is None:  # as the runtime set it (train.tokenizer); not always saved
        tokenizer.pad_token = tokenizer.eos_token
    if spec.data.format == "chat" and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHAT_TEMPLATE
    dtype = compute_dtype(spec.training.precision, device)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True).to(device)
    model.eval()
    return model, tokenizer, spec


def sample(uri: str, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
           storage_options: dict[str, Any] | None = None, device: str | None = None, inp: str = "",
           base: str | None = None, force: bool = False) -> str:
    """The completion of ``prompt`` by the model trained under ``uri`` (see the module docstring); an
    adapter is loaded on its base after the lineage check (``base``: another base folder; ``force``)."""
    import torch

    from ..storage.fetch import fetch_dir

    folder_uri, whole = find_artifact(uri, storage_options)
    print(f"sampling from {folder_uri}", file=sys.stderr)
    if not whole:
        from .adapters import AdapterSet

        aset = AdapterSet.load([folder_uri], base=base, storage_options=storage_options, device=device, force=force)
        return aset.complete(prompt, inp=inp, max_new_tokens=max_new_tokens, temperature=temperature)
    cache = Path(os.environ.get("FTCLUSTER_CACHE") or Path.home() / ".cache" / "ftcluster")
    folder = fetch_dir(folder_uri, storage_options, cache / "samples")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tokenizer, spec = load(folder, dev)
    ids = format_prompt(tokenizer, spec.data.format, prompt, inp)
    return generate(model, tokenizer, ids, max_new_tokens, temperature, spec.training.seed)


def compare(adapters: list[str], prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
            storage_options: dict[str, Any] | None = None, device: str | None = None, inp: str = "",
            base: str | None = None, force: bool = False) -> list[tuple[str, str, str]]:
    """``[(name, uri, completion)]``: each adapter (``NAME=URI`` or ``URI``) on one base loaded once."""
    from .adapters import AdapterSet

    pairs = []
    for a in adapters:
        name, sep, where = a.partition("=")
        named = sep and "/" not in name and ":" not in name  # NAME=URI; a URI may hold '=' itself
        pairs.append((name, where) if named else (None, a))
    aset = AdapterSet.load(pairs, base=base, storage_options=storage_options, device=device, force=force)
    out = []
    for name in aset.names:
        text = aset.use(name).complete(prompt, inp=inp, max_new_tokens=max_new_tokens, temperature=temperature)
        out.append((name, aset.adapters[name].uri, text))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ftcluster.train.sample", description=__doc__.splitlines()[0])
    ap.add_argument("uri", nargs="?", help="the run's output URI (output.uri), or an artifact folder")
    ap.add_argument("--adapter", action="append", default=[],
                    help="NAME=URI or URI of an adapter (repeatable): each answers PROMPT on one base loaded once")
    ap.add_argument("--base", default=None, help="the base model folder to load adapters on (default: their record's)")
    ap.add_argument("--force", action="store_true", help="load an adapter on a base it was not trained on")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--input", default="", help="data.format instruction: the record's input field")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if there is one)")
    ap.add_argument("--storage-options", default="{}", help="JSON: fsspec options for the URI")
    args = ap.parse_args(argv)
    if bool(args.uri) == bool(args.adapter):
        ap.error("give a run's URI, or one --adapter or more (not both)")
    import logging

    logging.basicConfig(format="warning: %(message)s", level=logging.WARNING, stream=sys.stderr)
    try:
        import warnings

        import transformers

        warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notes, not the user's

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        options = json.loads(args.storage_options)
        if args.adapter:
            answers = compare(args.adapter, args.prompt, args.max_new_tokens, args.temperature, options, args.device,
                              args.input, args.base, args.force)
            for i, (name, uri, text) in enumerate(answers):
                print(("\n" if i else "") + f"== {name}  ({uri})\n{text}")
            return 0
        text = sample(args.uri, args.prompt, args.max_new_tokens, args.temperature, options, args.device,
                      args.input, args.base, args.force)
    except FtclusterError as err:
        if os.environ.get("FTCLUSTER_DEBUG") == "1":
            raise
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 1
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
