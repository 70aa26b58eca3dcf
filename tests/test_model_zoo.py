"""The released checkpoints: the zoo table, ``released`` in every driver, the offline message, and
``tools/paper_tables.py`` (parameter counts of every row; results of our own evaluation runs ingested)."""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fidelity import golden
from helpers import REPO, free_port, load_script, write_tiny_ade

from mpvit import CheckpointError, model_zoo
from mpvit.checkpoint import read_checkpoint

# The reference implementation's trainable parameters, measured from its code (fidelity kit).
REFERENCE_PARAMS = {
    'mpvit_tiny': 5_843_736, 'mpvit_xsmall': 10_573_448, 'mpvit_small': 22_892_400, 'mpvit_base': 74_845_976,
    **{f'retinanet_mpvit_{v}_{s}': n for v, n in zip(('tiny', 'xsmall', 'small', 'base'),
                                                      (15_104_612, 19_911_060, 32_294_268, 84_635_428))
       for s in ('1x', 'ms_3x')},
    **{f'mask_rcnn_mpvit_{v}_{s}': n for v, n in zip(('tiny', 'xsmall', 'small', 'base'),
                                                     (25_712_224, 30_434_704, 42_744_184, 94_667_552))
       for s in ('1x', 'ms_3x')},
    'deformable_detr_mpvit_small': 34_448_361, 'upernet_mpvit_small': 51_588_020, 'upernet_mpvit_base': 105_295_196,
}


def _unreachable_url(name: str = 'weights.pth') -> str:
    return f'http://127.0.0.1:{free_port()}/{name}'  # nothing listens there: refused at once


def test_zoo_lists_every_released_checkpoint():
    entries = model_zoo.entries()
    assert len(entries) == 23 == len({e.name for e in entries}) == len({e.url for e in entries})
    by_task = {t: [e for e in entries if e.task == t] for t in model_zoo.TASKS}
    assert {t: len(v) for t, v in by_task.items()} == {'classification': 4, 'detectron2': 16, 'mmseg': 2,
                                                        'deformable_detr': 1}
    assert set(REFERENCE_PARAMS) == {e.name for e in entries}
    for entry in entries:
        assert (REPO / entry.config).is_file(), entry.config
        assert entry.url.startswith('https://') and entry.url.endswith('.pth')
    assert all(e.metrics_url and e.metrics_url.endswith('_metrics.json') for e in by_task['detectron2'])
    assert model_zoo.get('mask_rcnn_mpvit_small_ms_3x').reported == {'box_ap': 48.4, 'mask_ap': 43.9,
                                                                     'params_m': 43, 'gflops': 268}
    assert model_zoo.get('upernet_mpvit_base').reported['miou'] == 50.3


def test_released_resolves_by_config():
    for entry in model_zoo.entries():
        assert model_zoo.resolve('released', REPO / entry.config) == entry.url
    # Two tasks have a config called mpvit_small.yaml: the folder tells them apart.
    assert model_zoo.for_config('configs/deformable_detr/mpvit_small.yaml').name == 'deformable_detr_mpvit_small'
    assert model_zoo.resolve('released', model='mpvit_base') == model_zoo.get('mpvit_base').url
    assert model_zoo.resolve('local.pth', 'configs/detectron2/retinanet_mpvit_tiny_1x.yaml') == 'local.pth'
    with pytest.raises(ValueError, match='no checkpoint for this config.*pass a file or URL'):
        model_zoo.resolve('released', 'configs/detectron2/cascade_mask_rcnn_mpvit_small_ms_3x.yaml')
    # A demo config reports on the row of the config it inherits from.
    assert importlib.import_module('mpvit.eval_results').paper_row(
        'detectron2', REPO / 'configs/detectron2/demo/mask_rcnn_mpvit_tiny_shapes.yaml') \
        == 'mask_rcnn_mpvit_tiny_1x'


# ------------------------------------------------------------------- zoo: words, the URLs in one place

ZOO_WORD = re.compile(r'\bzoo:([A-Za-z0-9_.-]+)')
WEIGHT_URL = re.compile(r'https?://\S+\.(?:pth|pkl|safetensors|bin)\b')


def _project_files() -> list:
    """The repository's files, tracked or new (not ignored), as git lists them."""
    try:
        out = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'], cwd=REPO,
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip('not a git checkout')
    return sorted({REPO / f for f in out.decode().split('\0') if f and (REPO / f).is_file()})


def test_model_zoo_json_is_the_only_file_with_the_urls_and_every_word_names_a_row():
    files = _project_files()
    needle = b'dropbox' + b'.com'  # split: this file must not match itself
    holders = [f.relative_to(REPO).as_posix() for f in files if needle in f.read_bytes().lower()]
    assert holders == ['mpvit/model_zoo.json'], holders
    words = {}
    for f in files:
        rel = f.relative_to(REPO).as_posix()
        if rel.startswith('tests/') or f.suffix not in ('.py', '.yaml', '.yml', '.md', '.json', '.sh'):
            continue  # tests name unknown words on purpose
        for name in ZOO_WORD.findall(f.read_text(encoding='utf-8')):
            words.setdefault(name, []).append(rel)
    known = {e.name for e in model_zoo.entries()}
    assert not {n: w for n, w in words.items() if n not in known}, 'zoo: words naming no row of model_zoo.json'
    configs = [f for f in files if f.relative_to(REPO).parts[0] == 'configs']
    # Configs name weights by a word, never by a URL; every dense config starts from an ImageNet row.
    assert not [f for f in configs if WEIGHT_URL.search(f.read_text())]
    dense = [f for f in configs if f.relative_to(REPO).parts[1] != 'classification' and 'mpvit_' in f.name
             and '_base_' not in f.parts and not f.name.startswith(('_', 'Base-')) and 'demo' not in f.parts]
    assert len(dense) >= 30 and all(ZOO_WORD.search(f.read_text()) for f in dense), dense
    for entry in model_zoo.entries():  # and every row's config exists
        assert entry.config_file.is_file() and entry.config_file == REPO / entry.config, entry.name


def test_unknown_zoo_word_is_one_line_naming_the_known_ones():
    from mpvit.errors import UnknownNameError
    from mpvit.weights import fetch

    for call in (lambda: fetch('zoo:mpvit_smal'), lambda: model_zoo.resolve('zoo:mpvit_smal', model='mpvit_small'),
                 lambda: read_checkpoint('zoo:mpvit_smal')):
        with pytest.raises(UnknownNameError) as info:
            call()
        message = str(info.value)
        assert '\n' not in message and "'zoo:mpvit_smal'" in message and 'zoo:mpvit_small' in message
        assert 'zoo:upernet_mpvit_base' in message
    assert model_zoo.resolve('zoo:mpvit_small', 'configs/detectron2/retinanet_mpvit_tiny_1x.yaml') == 'zoo:mpvit_small'
    assert model_zoo.zoo_entry('zoo:mpvit_small').url == model_zoo.get('mpvit_small').url


def test_missing_config_is_an_error_not_a_silent_none(tmp_path, monkeypatch):
    from mpvit.errors import MissingFileError

    eval_results = importlib.import_module('mpvit.eval_results')

    with pytest.raises(MissingFileError, match=r'configs/detectron2/nope.yaml: no such config \(looked in '):
        model_zoo.config_path('configs/detectron2/nope.yaml')
    with pytest.raises(MissingFileError, match='gone.yaml: no such config file'):
        eval_results.paper_row('detectron2', tmp_path / 'gone.yaml')
    (tmp_path / 'child.yaml').write_text('_BASE_: missing_base.yaml\n')
    with pytest.raises(MissingFileError, match='child.yaml: _BASE_ missing_base.yaml does not exist'):
        eval_results.paper_row('detectron2', tmp_path / 'child.yaml')
    # Named relative to the repository root, a config is found from any working directory.
    monkeypatch.chdir(tmp_path)
    assert eval_results.paper_row('detectron2', 'configs/detectron2/demo/mask_rcnn_mpvit_tiny_shapes.yaml') \
        == 'mask_rcnn_mpvit_tiny_1x'


def test_zoo_word_reaches_every_loader(tmp_path, monkeypatch):
    """``zoo:mpvit_tiny`` in place of a file: each loader finds the row's file in the weights directory (under
    its released name) through mpvit.weights.fetch, and loads the same weights."""
    import timm
    import torch

    from mpvit import load_backbone_weights
    from mpvit.checkpoint import local_checkpoint

    monkeypatch.setenv('MPVIT_WEIGHTS', str(tmp_path / 'weights'))
    (tmp_path / 'weights').mkdir()
    torch.manual_seed(0)
    source = timm.create_model('mpvit_tiny').eval()
    planted = tmp_path / 'weights' / 'mpvit_tiny.pth'  # the released file's name (model_zoo.json)
    torch.save({'model': source.state_dict()}, planted)
    key = 'stem.0.conv.weight'
    expected = source.state_dict()[key]
    word = 'zoo:mpvit_tiny'

    assert local_checkpoint(word) == str(planted)
    loaded = {'timm pretrained_cfg_overlay file': timm.create_model(
        'mpvit_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=word)).state_dict()[key]}
    ours = timm.create_model('mpvit_tiny')
    load_backbone_weights(ours, word)
    loaded['load_backbone_weights'] = ours.state_dict()[key]
    cls = load_script('classification/main.py')
    assert cls.parse_args(['--model', 'mpvit_tiny', '--eval', '--resume', word]).resume == word
    predict = load_script('tools/predict.py')
    from PIL import Image

    Image.new('RGB', (64, 64), (200, 30, 30)).save(tmp_path / 'red.png')
    top = predict.predict(predict.parse_args([str(tmp_path / 'red.png'), '--model', 'mpvit_tiny', '--weights', word,
                                              '--top', '1']))
    assert len(top) == 1 and 0.0 < top[0][0]['probability'] <= 1.0

    if _has('detectron2'):
        from detectron2.config import get_cfg
        from detectron2.modeling import build_model

        from mpvit.d2 import MPViTCheckpointer, add_mpvit_config

        cfg = get_cfg()
        add_mpvit_config(cfg)
        cfg.merge_from_file(str(REPO / 'configs' / 'detectron2' / 'retinanet_mpvit_tiny_1x.yaml'))
        assert cfg.MODEL.WEIGHTS == word  # the config itself names the row
        cfg.merge_from_list(['MODEL.DEVICE', 'cpu', 'MODEL.MPVIT.NORM', 'BN'])
        detector = build_model(cfg)
        MPViTCheckpointer(detector).load(cfg.MODEL.WEIGHTS)
        loaded['Detectron2 MPViTCheckpointer'] = detector.backbone.bottom_up.backbone.state_dict()[key]
    if _has('mmseg'):
        from mmengine.runner.checkpoint import CheckpointLoader
        from mmseg.registry import MODELS

        import mpvit.mmseg  # noqa: F401  (mmengine reads through our loader)

        state = CheckpointLoader.load_checkpoint(word)
        loaded['mmengine CheckpointLoader'] = state['model'][key]
        backbone = MODELS.build(dict(type='MPViT', model_name='tiny',
                                     init_cfg=dict(type='Pretrained', checkpoint=word)))
        backbone.init_weights()
        loaded['mmseg init_cfg'] = backbone.state_dict()[key]
    if _has('transformers'):
        ddetr = load_script('deformable_detr/main.py')
        args = ddetr.get_args(['-c', str(REPO / 'configs/deformable_detr/mpvit_tiny.yaml')])
        assert args.pretrained == word  # read by main() through local_checkpoint / read_checkpoint
    for loader, value in loaded.items():
        assert torch.equal(value, expected), loader


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_offline_download_is_one_clear_line():
    url = _unreachable_url('mask_rcnn_mpvit_small_ms_3x.pth')
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(url)
    message = str(info.value)
    # Every place is named: the weights directory (by the released name), then the URL with its reason.
    assert '\n' not in message and url in message and 'pass its path' in message
    from mpvit.weights import local_names

    assert f"{os.environ['MPVIT_WEIGHTS']} ($MPVIT_WEIGHTS) for {local_names(url)[0]}" in message


def test_drivers_resolve_released(monkeypatch):
    pytest.importorskip('detectron2')
    train_net = load_script('detectron2/train_net.py')
    config = REPO / 'configs/detectron2/mask_rcnn_mpvit_small_ms_3x.yaml'
    args = train_net.argument_parser().parse_args(
        ['--config-file', str(config), '--eval-only', 'MODEL.WEIGHTS', 'released', 'OUTPUT_DIR', '/tmp/unused',
         'DATASETS.TEST', '()'])  # no COCO here: setup checks the datasets it names
    monkeypatch.setattr(train_net, 'default_setup', lambda cfg, args: None)
    assert train_net.setup(args).MODEL.WEIGHTS == model_zoo.get('mask_rcnn_mpvit_small_ms_3x').url

    ddetr = load_script('deformable_detr/main.py')
    args = ddetr.get_args(['-c', str(REPO / 'configs/deformable_detr/mpvit_small.yaml'), '--eval', '--resume',
                           'released'])
    assert args.resume == model_zoo.get('deformable_detr_mpvit_small').url

    cls = load_script('classification/main.py')
    assert cls.parse_args(['--model', 'mpvit_xsmall', '--eval', '--resume', 'released']).resume \
        == model_zoo.get('mpvit_xsmall').url


def _point_zoo_at(monkeypatch, name: str) -> str:
    """Make the released URL of ``name`` one that cannot be downloaded (as on our offline machines)."""
    url = _unreachable_url(Path(model_zoo.get(name).url).name)
    patched = [model_zoo.ZooEntry(**{**e.__dict__, 'url': url}) if e.name == name else e
               for e in model_zoo.entries()]
    monkeypatch.setattr(model_zoo, 'entries', lambda: patched)
    return url


def test_released_offline_fails_before_work_in_every_driver(monkeypatch, tmp_path):
    url = _point_zoo_at(monkeypatch, 'mpvit_tiny')
    cls = load_script('classification/main.py')
    with pytest.raises(CheckpointError, match=f'cannot find the weights .* {re.escape(url)}: '):
        cls.main(cls.parse_args(['--model', 'mpvit_tiny', '--eval', '--resume', 'released',
                                 '--data-path', str(tmp_path / 'missing')]))

    pytest.importorskip('transformers')
    url = _point_zoo_at(monkeypatch, 'deformable_detr_mpvit_small')
    ddetr = load_script('deformable_detr/main.py')
    with pytest.raises(CheckpointError, match=f'cannot find the weights .* {re.escape(url)}: '):
        ddetr.main(['-c', str(REPO / 'configs/deformable_detr/mpvit_small.yaml'), '--eval', '--resume', 'released',
                    '--coco-path', str(tmp_path / 'missing'), '--output-dir', str(tmp_path / 'out')])

    pytest.importorskip('mmseg')
    url = _point_zoo_at(monkeypatch, 'upernet_mpvit_small')
    seg_test = load_script('semantic_segmentation/tools/test.py')
    ade = write_tiny_ade(tmp_path / 'ade')
    with pytest.raises(CheckpointError, match=f'cannot find the weights .* {re.escape(url)}: '):
        seg_test.main([str(REPO / 'configs/semantic_segmentation/upernet_mpvit_small_160k_ade20k.py'), 'released',
                       '--work-dir', str(tmp_path / 'seg'), '--cfg-options', f'data_root={ade}',
                       *(f'{split}_dataloader.dataset.data_root={ade}' for split in ('train', 'val', 'test'))])
    # Training: the backbone's ImageNet init_cfg URL is fetched before the Runner builds anything.
    seg_train = load_script('semantic_segmentation/tools/train.py')
    monkeypatch.setattr(seg_train.Runner, 'from_cfg', lambda cfg: pytest.fail('Runner built before the check'))
    url = _unreachable_url('mpvit_small.pth')
    with pytest.raises(CheckpointError, match=f'cannot find the weights .* {re.escape(url)}: '):
        seg_train.main([str(REPO / 'configs/semantic_segmentation/upernet_mpvit_small_160k_ade20k.py'),
                        '--work-dir', str(tmp_path / 'seg_train'), '--cfg-options',
                        f'data_root={ade}', f'train_dataloader.dataset.data_root={ade}',
                        f'val_dataloader.dataset.data_root={ade}', f'test_dataloader.dataset.data_root={ade}',
                        f'model.backbone.init_cfg.checkpoint={url}'])


def test_detectron2_unreachable_weights_is_one_line(tmp_path):
    pytest.importorskip('detectron2')
    url = _unreachable_url('retinanet_mpvit_tiny_1x.pth')
    proc = subprocess.run(
        [sys.executable, str(REPO / 'detectron2/train_net.py'), '--config-file',
         str(REPO / 'configs/detectron2/retinanet_mpvit_tiny_1x.yaml'), '--eval-only', 'MODEL.WEIGHTS', url,
         'MODEL.DEVICE', 'cpu', 'OUTPUT_DIR', str(tmp_path), 'DATASETS.TEST', '()'],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('error: cannot find the weights retinanet_mpvit_tiny_1x.pth') and url in last


# ------------------------------------------------------------------------------------- paper tables

@pytest.fixture(scope='module')
def paper_tables():
    pytest.importorskip('detectron2')
    pytest.importorskip('mmseg')
    pytest.importorskip('transformers')
    return load_script('tools/paper_tables.py')


@pytest.mark.slow
def test_paper_tables_parameter_counts_equal_the_reference(paper_tables, tmp_path):
    rows = paper_tables.main(['--no-flops', '--json', str(tmp_path / 'rows.json')])
    assert {r['name']: r['params'] for r in rows} == REFERENCE_PARAMS
    assert json.loads((tmp_path / 'rows.json').read_text()) == {'rows': rows, 'other_results': []}


def test_paper_tables_flops_conventions(paper_tables, tmp_path, monkeypatch):
    cache = tmp_path / 'flops.json'
    entry = model_zoo.get('mpvit_tiny')
    model = paper_tables.build_model(entry)
    expected = golden('manifest_mpvit_tiny.json')['fvcore_flops_224'] / 1e9  # the reference's count
    assert paper_tables.cached_flops(entry, model, cache) == {'gflops': expected}
    stored = json.loads(cache.read_text())  # cached, keyed by the code it depends on
    assert list(stored.values()) == [{'gflops': expected}]
    monkeypatch.setattr(paper_tables, 'count_flops', None)  # a second call must read the cache, not count
    assert paper_tables.cached_flops(entry, model, cache) == {'gflops': expected}
    text = paper_tables.render([dict(name='mpvit_tiny', task='classification', reported=entry.reported,
                                     params=5_843_736, gflops=1.654)])
    assert '| mpvit_tiny | 78.2 | 5,843,736 | 5.8M | 1.7 | 1.6 |' in text and 'fvcore at 1x3x224x224' in text


def test_paper_tables_dense_flop_counters_run(paper_tables, monkeypatch):
    """The detection and segmentation counters, at a small size (the real ones take minutes on a CPU)."""
    monkeypatch.setattr(paper_tables, 'DETECTION_SIZE', (128, 160))
    monkeypatch.setattr(paper_tables, 'SEGMENTATION_SIZE', (64, 128))
    entry = model_zoo.get('retinanet_mpvit_tiny_1x')
    det = paper_tables.count_flops(entry, paper_tables.build_model(entry))
    assert 0 < det['backbone_fpn_gflops'] < det['gflops']
    entry = model_zoo.get('upernet_mpvit_small')
    seg = paper_tables.count_flops(entry, paper_tables.build_model(entry))['gflops']
    assert seg == pytest.approx(945.3 * (64 * 128) / (512 * 2048), rel=0.1)  # scales with the pixels


def test_paper_tables_place_results_only_on_their_dataset_rows(paper_tables, tmp_path, capsys):
    """A result stands on a paper row only when measured on that row's dataset and split (all its images); a
    run on other data (here a real classification evaluation of a 2-class folder, and a file without a dataset
    record) is listed apart, never as a difference to the paper; several files for one row are flagged."""
    cls_main = load_script('classification/main.py')
    from mpvit.demo_data import write_shapes_imagefolder
    data = write_shapes_imagefolder(tmp_path / 'data', num_classes=2, train_per_class=2, val_per_class=2, size=32)
    cls_main.main(cls_main.parse_args(['--model', 'mpvit_tiny', '--input-size', '32', '--batch-size', '2',
                                       '--num-workers', '0', '--amp', 'none', '--eval', '--data-path', str(data),
                                       '--output-dir', str(tmp_path / 'results' / 'cls')]))
    own = json.loads((tmp_path / 'results' / 'cls' / 'eval_metrics.json').read_text())
    assert own['paper_row'] == 'mpvit_tiny' and own['dataset']['name'] == 'data' and own['dataset']['images'] == 4
    seg_config = REPO / 'configs/semantic_segmentation/upernet_mpvit_small_160k_ade20k.py'
    eval_results = importlib.import_module('mpvit.eval_results')
    ade20k_val = eval_results.dataset_record('ade20k', 'validation', 2000)
    for name, miou in (('seg_a', 12.5), ('seg_b', 40.0)):  # two evaluations of one row, the second newer
        eval_results.write_eval_metrics(tmp_path / 'results' / name / 'eval_metrics.json', 'mmseg',
                                        {'mIoU': miou}, config=seg_config, dataset=ade20k_val)
        os.utime(tmp_path / 'results' / name / 'eval_metrics.json', (1e9 + miou, 1e9 + miou))
    eval_results.write_eval_metrics(tmp_path / 'results' / 'subset' / 'eval_metrics.json', 'mmseg', {'mIoU': 60.0},
                                    config=seg_config, dataset=eval_results.dataset_record('ade20k', 'validation', 100))
    eval_results.write_eval_metrics(tmp_path / 'results' / 'old' / 'eval_metrics.json', 'mmseg', {'mIoU': 1.0},
                                    config=seg_config)  # no dataset record (older files)

    results = paper_tables.read_results(tmp_path / 'results')
    assert set(results.rows) == {'upernet_mpvit_small'} and results.rows['upernet_mpvit_small']['mIoU'] == 40.0
    assert len(results.candidates['upernet_mpvit_small']) == 2
    assert sorted(Path(r['source']).parent.name for r in results.other) == ['cls', 'old', 'subset']
    rows = paper_tables.build_rows(flops=False, results=results.rows, candidates=results.candidates,
                                   names=['mpvit_tiny', 'upernet_mpvit_small'])
    text = paper_tables.render(rows, with_results=True, flops=False)
    assert '| mpvit_tiny | 78.2 | no results |' in text  # the 2-class run is not on the ImageNet row
    assert '| upernet_mpvit_small | 48.3 | 40.00 (!) | -8.30 |' in text
    assert re.search(r'\(!\) upernet_mpvit_small: 2 files evaluate this row .*seg_b.*the others: .*seg_a', text)
    other = paper_tables.render_other(results.other)
    assert f"data val, 4 images | acc1 {own['acc1']:.2f} |" in other and 'ade20k validation, 100 images' in other
    assert '| not recorded | miou 1.00 |' in other

    paper_tables.main(['--no-flops', '--results', str(tmp_path / 'results'), '--json', str(tmp_path / 't.json'),
                       '--rows', 'mpvit_tiny', 'upernet_mpvit_small'])
    printed = capsys.readouterr()
    assert 'Other results' in printed.out and '[paper_tables] 2/2 upernet_mpvit_small' in printed.err
    assert len(json.loads((tmp_path / 't.json').read_text())['other_results']) == 3
