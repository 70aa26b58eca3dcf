"""Segment one image with a trained UperNet-MPViT: print the classes found (share of the pixels) and write the
colour overlay as a PNG.

    python semantic_segmentation/demo.py IMAGE CONFIG CHECKPOINT --out overlay.png [--device cuda:0]
    python semantic_segmentation/demo.py IMAGE CONFIG released      # the authors' checkpoint of CONFIG

The class names (and colours) are the checkpoint's, those it was trained on (mmengine stores them in
``meta.dataset_meta``; the released mmseg 0.x files in ``meta.CLASSES``); the config's data only when the
checkpoint names none.
"""
from __future__ import annotations

import mpvit.quiet  # noqa: F401  (first: known dependency warnings off in this command)

import argparse
import os.path as osp
from typing import Dict, List, Optional, Tuple

import numpy as np

from mpvit import model_zoo
from mpvit.checkpoint import local_checkpoint, read_checkpoint
from mpvit.errors import InvalidInputError, MissingFileError
from mpvit.images import decode_error
from mpvit.training import ensure_writable_dir, user_errors_in_one_line


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('image')
    parser.add_argument('config')
    parser.add_argument('checkpoint', help=f"file, URL, or '{model_zoo.RELEASED}' (the authors' weights of CONFIG)")
    parser.add_argument('--out', default='overlay.png', help='the overlay PNG to write')
    parser.add_argument('--opacity', type=float, default=0.5)
    parser.add_argument('--device', default='cpu')
    return parser.parse_args(argv)


def checkpoint_classes(checkpoint: Dict) -> Optional[Dict]:
    """``{'classes', 'palette'}`` stored in a checkpoint (mmengine's ``dataset_meta``, mmseg 0.x's
    ``CLASSES`` / ``PALETTE``), or ``None``."""
    meta = checkpoint.get('meta') or {}
    dataset_meta = meta.get('dataset_meta') or {}
    if dataset_meta.get('classes'):
        return dict(classes=tuple(dataset_meta['classes']), palette=dataset_meta.get('palette'))
    if meta.get('CLASSES'):
        return dict(classes=tuple(meta['CLASSES']), palette=meta.get('PALETTE'))
    return None


def class_shares(prediction: np.ndarray, classes: Tuple[str, ...]) -> List[Tuple[str, float]]:
    """The classes present in a predicted label map, with their share of its pixels, largest first."""
    counts = np.bincount(prediction.ravel().astype(np.int64), minlength=len(classes))
    total = max(int(counts.sum()), 1)
    order = np.argsort(-counts, kind='stable')
    return [(classes[i] if i < len(classes) else f'class {i}', counts[i] / total) for i in order if counts[i]]


def main(argv=None) -> str:
    args = parse_args(argv)
    if not osp.isfile(args.image):
        raise MissingFileError(f'image not found: {args.image}')
    error = decode_error(args.image)
    if error is not None:
        raise InvalidInputError(f'cannot read image {args.image}: {" ".join(str(error).split())}')
    from mmseg.apis import inference_model, init_model, show_result_pyplot

    from mpvit.mmseg import load_segmentor_weights
    from mpvit.mmseg.run_config import fit_to_data, load_run_config  # the train / test tools' config reading

    cfg = load_run_config(args.config)
    weights = local_checkpoint(model_zoo.resolve(args.checkpoint, args.config))
    checkpoint = read_checkpoint(weights)
    meta = checkpoint_classes(checkpoint)
    if meta is None:  # an unnamed checkpoint: the config's data names the classes
        classes = fit_to_data(cfg)
        meta = dict(classes=tuple(classes or ()), palette=None)
    for name in ('decode_head', 'auxiliary_head'):  # the model is the checkpoint's, whatever the config's data
        if isinstance(cfg.model.get(name), dict):
            cfg.model[name].num_classes = len(meta['classes'])
    model = init_model(cfg, None, device=args.device)
    load_segmentor_weights(model, weights, checkpoint=checkpoint)
    if not meta['palette'] or len(meta['palette']) < len(meta['classes']):  # fixed colours, one per class
        meta['palette'] = np.random.default_rng(0).integers(0, 256, (len(meta['classes']), 3)).tolist()
    model.dataset_meta = meta
    ensure_writable_dir(osp.dirname(osp.abspath(args.out)), 'output directory')

    result = inference_model(model, args.image)
    prediction = result.pred_sem_seg.data.squeeze(0).cpu().numpy()
    print(f'{args.image}: {prediction.shape[1]}x{prediction.shape[0]}, classes of {weights}:')
    for name, share in class_shares(prediction, meta['classes']):
        print(f'  {name:<24} {100 * share:5.1f}%')
    # save_dir: mmseg's visualizer warns without one; with out_file it writes only that file.
    show_result_pyplot(model, args.image, result, opacity=args.opacity, show=False, out_file=args.out,
                       save_dir=osp.dirname(osp.abspath(args.out)))
    print(f'wrote the overlay to {osp.abspath(args.out)}')
    return args.out


if __name__ == '__main__':
    with user_errors_in_one_line():
        main()
