"""Turn a released MPViT checkpoint (any of the 23, in any of their formats) into a Hugging Face Hub folder.

    python tools/export_hub.py mpvit_small --weights released --out hub/mpvit_small.in1k
    python tools/export_hub.py mask_rcnn_mpvit_small_ms_3x --weights copy.pth --out hub/mask_rcnn --hub-id me/mpvit

The folder holds what timm and the Hub expect, written by timm's own ``save_for_hf``:

- ``model.safetensors`` + ``config.json``: the timm model (the ImageNet classifier, or the
  backbone of a detector / segmentor with ``num_classes=0``), loadable with
  ``timm.create_model('hf-hub:<id>', pretrained=True)`` once uploaded (``local-dir:<folder>`` before), and
  with transformers' ``AutoModelForImageClassification`` / ``AutoModel`` (``TimmWrapper``) and
  ``TimmBackbone.from_pretrained('hf-hub:<id>')``, once ``import mpvit`` has registered the models;
- for a dense checkpoint also ``<name>.safetensors``: the whole detector / segmentor in its
  released key layout, which ``released`` finds on the Hub once ``model_zoo.json`` names the
  repository (``hf_hub_id``);
- ``README.md``: the model card of ``mpvit.model_zoo.model_card`` (the paper's figures, the weights'
  license, the source file's sha256, usage and the citation), the one ``push_to_hf_hub`` takes too.

Upload it with ``huggingface-cli upload <id> <folder>`` (or timm's ``push_to_hf_hub``), then set the
row's ``hf_hub_id`` in ``mpvit/model_zoo.json``. The source file is read without running code from
it (``--drop-objects`` for one that carries other Python objects: they are left out).
"""
from __future__ import annotations

import mpvit.quiet  # noqa: F401  (first: known dependency warnings off in this command)

import argparse
import json
import os
import re
from pathlib import Path
from typing import Dict, Sequence

import timm
import torch

import mpvit  # noqa: F401  (registers the models)
from mpvit import model_zoo
from mpvit.checkpoint import checkpoint_tensors, load_backbone_weights, local_checkpoint
from mpvit.model_zoo import HUB_TASKS
from mpvit.serialization import check_container, load_dropping_objects, safe_load, save_safetensors
from mpvit.training import ensure_writable_dir, user_errors_in_one_line
from mpvit.weights import fetch, file_sha256


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('name', help=f"a released checkpoint ({', '.join(e.name for e in model_zoo.entries()[:3])}, "
                                     '...; see mpvit/model_zoo.json)')
    parser.add_argument('--weights', default=model_zoo.RELEASED,
                        help="its file, URL, or 'released' (the weights directory, the Hub, then the authors' URL)")
    parser.add_argument('--out', required=True, help='output folder (created)')
    parser.add_argument('--hub-id', help='the Hub repository it will be uploaded to, for the model card')
    parser.add_argument('--drop-objects', action='store_true',
                        help='read the file with inert stand-ins for objects outside the allowlist (left out)')
    args = parser.parse_args(argv)
    try:
        args.entry = model_zoo.get(args.name)
    except KeyError as e:
        parser.error(str(e.args[0]))
    return args


def render_card(card: Dict, name: str, task: str) -> str:
    """A README.md for ``card`` (``mpvit.model_zoo.model_card``): YAML front matter, then sections."""
    lines = ['---', f"license: {card['license']}", f"license_name: {card['license_name']}",
             f"license_link: {card['license_link']}", 'library_name: timm', f'pipeline_tag: {HUB_TASKS[task]}',
             'tags:', *[f'- {tag}' for tag in card['tags']], 'datasets:', f"- {card['details']['Dataset'].lower()}",
             '---', f'# {name}', '', card['description'], '', '## Model details']
    for key, value in card['details'].items():
        if isinstance(value, dict):
            lines += [f'- **{key}:**', *[f'  - {k}: {v}' for k, v in value.items()]]
        else:
            lines.append(f'- **{key}:** {value}')
    lines += ['', '## Use', '', card['usage'], '## Citation', '', '```bibtex', card['citation'], '```', '']
    return '\n'.join(lines)


def loadable_by_transformers(config_path: Path) -> None:
    """Drop ``model_args.num_classes`` from timm's ``config.json``: the root ``num_classes`` already says it (timm
    reads that), and transformers' ``TimmWrapper`` passes its ``num_labels`` as ``num_classes`` besides
    ``model_args``, which fails with "multiple values for keyword argument 'num_classes'" (timm 1.0.31,
    transformers 5.23)."""
    config = json.loads(config_path.read_text())
    if config.get('model_args', {}).pop('num_classes', config['num_classes']) != config['num_classes']:
        raise RuntimeError(f'{config_path}: model_args.num_classes disagrees with num_classes')
    if not config.get('model_args', True):
        del config['model_args']
    config_path.write_text(json.dumps(config, indent=2))


def usual_permissions(folder: Path) -> None:
    """Each file readable as any other new file (``0666 & ~umask``): timm's ``save_for_hf`` writes
    ``model.safetensors`` through a private temporary file (mode 0600), which a shared copy cannot serve."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def export(args: argparse.Namespace) -> Path:
    entry = args.entry
    variant = re.search(r'mpvit_(tiny|xsmall|small|base)', entry.name).group(0)
    source = model_zoo.resolve(args.weights, model=entry.name)
    if args.drop_objects:
        path = Path(fetch(source))
        check_container(str(path))
        checkpoint, _ = load_dropping_objects(str(path))
    else:
        path = Path(local_checkpoint(source))
        checkpoint = safe_load(str(path))
    classifier = entry.task == 'classification'
    model = timm.create_model(variant, num_classes=1000 if classifier else 0).eval()
    # The one loader: backbone extracted from any layout, classifier required to fit.
    load_backbone_weights(model, str(path), checkpoint=checkpoint, head='require')
    out = ensure_writable_dir(args.out, 'output folder')
    model_config: Dict = {}
    if classifier:
        info = timm.data.ImageNetInfo()
        model_config = dict(label_names=info.label_names(), label_descriptions=info.label_descriptions(as_dict=True))
    timm.models.save_for_hf(model, out, model_config=model_config, safe_serialization=True)
    loadable_by_transformers(out / 'config.json')
    if not classifier:
        save_safetensors(checkpoint_tensors(checkpoint, str(path)), out / entry.hub_filename,
                         metadata={'format': 'pt', 'source': path.name})
    sha256 = file_sha256(path)
    card = model_zoo.model_card(entry.name, hub_id=args.hub_id, source_sha256=sha256)
    (out / 'README.md').write_text(render_card(card, entry.name, entry.task))
    usual_permissions(out)
    files = sorted(p.name for p in out.iterdir())
    print(json.dumps({'name': entry.name, 'source': str(path), 'sha256': sha256, 'out': str(out), 'files': files}))
    return out


def main(argv: Sequence[str] | None = None) -> Path:
    with torch.no_grad():
        return export(parse_args(argv))


if __name__ == '__main__':
    with user_errors_in_one_line():
        main()
